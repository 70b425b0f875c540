"""The report's figures, rendered from a synthetic run (eval JSONs, benchmark TSVs, checkpoint folders with
layers.json and weights): nothing overlaps, and every evaluated checkpoint is drawn with its own number."""
import csv
import itertools
import json

import pytest
import torch
from safetensors.torch import save_file

from sds.core.config import validate_config
from sds.core.patterns import parse_pattern
from sds.report.figures import figures
from sds.report.inputs import benchmark_seconds as _benchmark_seconds, checkpoint_of, read_evals
from sds.report.report import build_report
from sds.storage.documents import write_json
from sds.storage.safetensors import save_tensors

METHODS = ["sparsegpt", "wanda", "magnitude", "admm", "alps", "sparsellm"]
PATTERNS = ["2:4", "unstructured:0.5", "4:8", "unstructured:0.7", "1:4"]
STAGES = ["prune1", "prune1+adjust", "sds"]
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"]
HIST_KEY = "model.decoder.layers.0.fc1.weight"


def _zeroshot(acc, stderr):
    return {"tasks": {"a": {"acc": acc, "acc_stderr": stderr, "n": 100}, "b": {"acc": acc, "acc_stderr": stderr,
                                                                              "n": 100}},
            "mean": {"acc": acc, "acc_stderr": stderr / 2 ** 0.5, "acc_norm": acc, "acc_norm_stderr": stderr}}


def synthetic_run(root, n_methods=3, n_patterns=3, recons=("default",), layers=12, datasets=("builtin", "held_out")):
    """A run's files as the pipeline lays them out; every number differs so a mix-up shows."""
    g = torch.Generator().manual_seed(0)
    R = root / "results" / "t"
    evals, benchmarks, checkpoints = [], [], []

    def write_eval(path, stage, method="", pattern="", recon="", ppl=10.0, acc=0.8):
        write_json(path, {"stage": stage, "method": method, "pattern": pattern, "recon": recon,
                          "ppl": {ds: (i + 1) * ppl for i, ds in enumerate(datasets)}, "windows": {"builtin": 4},
                          "sparsity": 0.0 if stage == "dense" else 0.5, "zeroshot": _zeroshot(acc, 0.03),
                          "seconds": 1.0}, output=True)  # as the evaluation writes it: with its checksum
        evals.append(str(path))

    def write_ckpt(path, errors):
        path.mkdir(parents=True)
        names = [f"model.decoder.layers.{i}.{n}.weight" for i in range(layers) for n in LINEARS]
        (path / "layers.json").write_text(json.dumps(
            {"linears": {n: {"rel_error": e, "rel_error_before": 2 * e} for n, e in zip(names, errors)}}, sort_keys=True))
        save_tensors(path / "weights.safetensors", {HIST_KEY: torch.randn(16, 8, generator=g)})  # with its checksum
        checkpoints.append(str(path))

    (root / "model").mkdir(parents=True)
    save_file({HIST_KEY: torch.randn(16, 8, generator=g)}, str(root / "model" / "model.safetensors"))
    write_eval(R / "eval" / "dense.json", "dense", ppl=20.0, acc=0.9)
    n_lin = layers * len(LINEARS)
    for k, (method, pattern) in enumerate(itertools.product(METHODS[:n_methods], PATTERNS[:n_patterns])):
        slug = parse_pattern(pattern).slug
        first = 0.05 + 0.2 * torch.rand(n_lin, generator=g)
        write_eval(R / "eval" / method / slug / "prune1.json", "prune1", method, pattern, ppl=21.0 + k, acc=0.85 - k / 100)
        write_eval(R / "eval" / method / slug / "prune1_adjust.json", "prune1+adjust", method, pattern,
                   ppl=20.5 + k / 2, acc=0.87 - k / 200)
        write_ckpt(R / method / slug / "prune1", first.tolist())
        write_ckpt(R / method / slug / "prune1_adjust", (first * 0.6).tolist())
        for j, recon in enumerate(recons):
            write_eval(R / "eval" / method / slug / recon / "sds.json", "sds", method, pattern, recon,
                       ppl=20.2 + k / 4 + j / 10, acc=0.88 - k / 300)
            write_ckpt(R / method / slug / recon / "sds", (first * (0.4 + j / 10)).tolist())
        for stage in ("prune1", "prune1_adjust", "evaluate"):
            benchmarks.append(R / "benchmarks" / stage / f"{method}_{slug}.tsv")
    for stage in ("calibration", "activations", "report"):
        benchmarks.append(R / "benchmarks" / stage / f"{stage}.tsv")
    for i, b in enumerate(benchmarks):
        b.parent.mkdir(parents=True, exist_ok=True)
        b.write_text("s\th:m:s\tmax_rss\n" f"{3.5 + i}\t0:00:03\t100\n")
    m0, p0 = METHODS[0], parse_pattern(PATTERNS[0]).slug
    write_ckpt(R / m0 / p0 / recons[0] / "reconstruct", [0.01] * n_lin)
    cfg = validate_config({"run": "t", "evaluate": {"datasets": {ds: "builtin" for ds in datasets}}})
    return cfg, evals, [str(b) for b in benchmarks], checkpoints, str(root / "model")


def _figures(run):
    cfg, evals, benchmarks, ckpts, model_dir = run
    return {p.name: p.figure for p in figures(cfg, read_evals(evals), _benchmark_seconds(benchmarks),
                                               [checkpoint_of(c) for c in ckpts], model_dir)}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The 3 methods × 3 patterns run: its report written (summary.csv, report.md, PNGs) and its figures."""
    root = tmp_path_factory.mktemp("run")
    run = synthetic_run(root)
    cfg, evals, benchmarks, ckpts, model_dir = run
    artifacts = build_report(cfg, evals, benchmarks, root / "report", root / "summary.csv", model_dir, ckpts)
    return root, evals, artifacts, _figures(run)


def _in_view(ax, label, axis):
    lo, hi = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    pos = label.get_position()[0 if axis == "x" else 1]
    return lo - 1e-9 <= pos <= hi + 1e-9


def tick_labels(fig):
    """The tick labels a drawn figure shows: visible, non-empty, at a tick inside the axes' view."""
    return [t for ax in fig.axes if ax.get_visible() for axis in "xy"
            for t in getattr(ax, f"get_{axis}ticklabels")() if t.get_visible() and t.get_text() and _in_view(ax, t, axis)]


def drawn_texts(fig):
    """Every text a drawn figure shows: tick labels, bar labels, titles, axis labels, legend entries."""
    from matplotlib.text import Text

    every_tick = {id(t) for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()}
    return tick_labels(fig) + [t for t in fig.findobj(Text) if id(t) not in every_tick and t.get_visible()
                               and t.get_text().strip() and (t.axes is None or t.axes.get_visible())]


def overlapping_texts(fig):
    """Pairs of drawn texts whose rendered window extents intersect."""
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in drawn_texts(fig)]
    clashes = []
    for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
        if min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5:
            clashes.append((ta, tb))
    return clashes


def clipped_texts(fig):
    """Drawn texts that leave the canvas, and value labels that leave their axes (a clipped label is as
    unreadable as an overlapping one)."""
    renderer = fig.canvas.get_renderer()
    w, h = fig.canvas.get_width_height()
    out = []
    for t in drawn_texts(fig):
        box = t.get_window_extent(renderer)
        if box.x0 < -1 or box.y0 < -1 or box.x1 > w + 1 or box.y1 > h + 1:
            out.append(t.get_text())
    for ax in fig.axes:
        frame = ax.get_window_extent(renderer)
        for t in ax.texts:  # bar value labels
            box = t.get_window_extent(renderer)
            if box.x0 < frame.x0 - 1 or box.x1 > frame.x1 + 1:
                out.append(t.get_text())
    return out


def drawn_bars(fig):
    """gid → bar width (the drawn value) of every bar carrying a gid."""
    from matplotlib.patches import Rectangle

    return {p.get_gid(): p.get_width() for p in fig.findobj(Rectangle) if p.get_gid() and "|" in p.get_gid()}


FIGURES = {"ppl.png", "layer_errors.png", "zeroshot.png", "seconds.png", "histograms.png"}


def test_every_checkpoint_of_summary_is_drawn_with_its_increase_over_dense(rendered):
    root, evals, artifacts, plots = rendered
    rows = list(csv.DictReader((root / "summary.csv").open()))
    pruned = [r for r in rows if r["stage"] != "dense"]
    assert len({(r["method"], r["pattern"], r["stage"]) for r in pruned}) == 3 * 3 * 3
    ppl = plots["ppl.png"]
    panels = {ax.get_title(loc="left").split(":")[0]: ax for ax in ppl.axes}
    assert set(panels) == {"builtin", "held_out"}
    dense = {r["dataset"]: float(r["ppl"]) for r in rows if r["stage"] == "dense"}
    for ds, ax in panels.items():
        assert f"dense PPL {dense[ds]:.3f}" in ax.get_title(loc="left")
        bars = drawn_bars(ax)
        expected = {f"{r['method']}|{r['pattern']}|{r['stage']}|{'' if r['recon'] == '-' else r['recon']}":
                    100 * (float(r["ppl"]) / dense[ds] - 1) for r in pruned if r["dataset"] == ds}
        assert set(bars) == set(expected)
        for key, value in expected.items():
            assert bars[key] == pytest.approx(value, abs=1e-3), key  # summary.csv keeps 4 decimals
    legend = [t.get_text() for t in ppl.legends[0].get_texts()]
    assert legend == ["one-shot", "one-shot + adjust", "SDS"]
    # zero-shot: the same groups and stages, each bar the change in mean accuracy over dense
    zs = drawn_bars(plots["zeroshot.png"])
    dense_acc = 0.9
    for path in evals:
        r = json.loads(open(path).read())
        if r["method"]:
            assert zs[f"{r['method']}|{r['pattern']}|{r['stage']}|{r['recon']}"] == \
                pytest.approx(100 * (r["zeroshot"]["mean"]["acc"] - dense_acc))
    # the saved files are the artifacts the stage logs, and report.md links each with its sentence
    md = (root / "report" / "report.md").read_text()
    for name in FIGURES:
        assert str(root / "report" / name) in artifacts
        assert (root / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in md
    assert md.index("](ppl.png)") < md.index("## Perplexity on")


def test_layer_errors_draw_every_linear_of_every_sparse_checkpoint(rendered):
    root, _, _, plots = rendered
    from matplotlib.collections import PathCollection

    drawn = {c.get_gid(): c for c in plots["layer_errors.png"].findobj(PathCollection) if c.get_gid()}
    found = 0
    for path in (root / "results" / "t").rglob("layers.json"):
        ckpt = checkpoint_of(path.parent)
        if ckpt.stage == "reconstruct":
            assert not any(k.endswith("|reconstruct|default") for k in drawn)
            continue
        errors = [v["rel_error"] for v in json.loads(path.read_text())["linears"].values()]
        points = drawn[f"{ckpt.method}|{ckpt.pattern}|{ckpt.stage}|{ckpt.recon}"].get_offsets()
        assert sorted(points[:, 1].tolist()) == pytest.approx(sorted(errors))
        found += 1
    assert found == 3 * 3 * 3
    md = (root / "report" / "report.md").read_text()
    table = md.split("## Relative output error")[1]
    first = [v["rel_error"] for v in json.loads((root / "results" / "t" / "wanda" / "4of8" / "prune1" /
                                                  "layers.json").read_text())["linears"].values()]
    assert f"| wanda | 4:8 | {sum(first) / len(first):.4f} | " in table
    # the caption names the scale the figure has (log: every error of this run is above 0)
    assert plots["layer_errors.png"].axes[0].get_yscale() == "log" and "after each stage (log scale;" in md


def _assert_readable(plots):
    assert set(plots) == FIGURES
    for name, fig in plots.items():
        fig.canvas.draw()
        assert len(tick_labels(fig)) >= 3, name
        assert overlapping_texts(fig) == [], name
        assert clipped_texts(fig) == [], name


def test_no_two_labels_overlap_in_any_figure(rendered):
    _assert_readable(rendered[3])


@pytest.mark.parametrize("shape", [dict(n_methods=5, n_patterns=4, recons=("default", "l1"), layers=24,
                                        datasets=("builtin",)),
                                   dict(n_methods=1, n_patterns=1, layers=2, datasets=("builtin",))])
def test_no_two_labels_overlap_for_few_or_many_methods_patterns_and_layers(tmp_path, shape):
    _assert_readable(_figures(synthetic_run(tmp_path, **shape)))


def test_figures_are_byte_identical_across_renders(tmp_path):
    cfg, evals, benchmarks, ckpts, model_dir = synthetic_run(tmp_path, n_methods=2, n_patterns=1, layers=2)
    first, second = (build_report(cfg, evals, benchmarks, tmp_path / out, tmp_path / "summary.csv", model_dir, ckpts)
                     for out in ("a", "b"))
    pngs = [(a, b) for a, b in zip(first, second) if a.endswith(".png")]
    assert len(pngs) == 5
    for a, b in pngs:
        assert open(a, "rb").read() == open(b, "rb").read(), a


# --- bytes on disk ---------------------------------------------------------------------------------------


def _stage_table(report: str) -> dict[str, str]:
    """'stage/job' → the bytes cell of the report's per-stage table."""
    section = report[report.index("## Seconds per stage"):]
    rows = [line.split("|")[1:-1] for line in section.splitlines()[6:]]
    cells = {}
    for row in rows:
        if len(row) != 4 or row[0].strip().startswith("**"):
            break
        cells[f"{row[0].strip()}/{row[1].strip()}"] = row[3].strip()
    return cells


def _exact(cell: str) -> int | None:
    return None if cell.strip("*") == "–" else int(cell.strip("*").split(" (")[0].replace(",", ""))


def _size(path) -> int:
    """du --apparent-size of an output: a folder's files, or a file and its sidecars (FILE.*)."""
    from pathlib import Path

    path = Path(path)
    files = path.rglob("*") if path.is_dir() else path.parent.glob(path.name + "*")
    return sum(f.stat().st_size for f in files if f.is_file())


def _multiple_rows(report: str) -> dict[str, tuple[int, str]]:
    section = report[report.index("## Bytes on disk per method and pattern"):].split("\n\n")[2]
    rows = [line.split("|")[1:-1] for line in section.splitlines()[2:]]
    return {f"{r[0].strip()} {r[1].strip()}".strip(): (_exact(r[2].strip()), r[3].strip()) for r in rows}


def test_the_bytes_column_is_each_outputs_size(tmp_path):
    cfg, evals, benchmarks, ckpts, model_dir = synthetic_run(tmp_path, n_methods=2, n_patterns=1, layers=2)
    R = tmp_path / "results" / "t"
    stats = R / "sparsegpt" / "2of4" / "prune1" / "stats"  # prune1's statistics count as its output
    stats.mkdir()
    save_tensors(stats / "layer_000.safetensors", {"H": torch.zeros(3)})
    build_report(cfg, evals, benchmarks, tmp_path / "report", tmp_path / "summary.csv", model_dir, ckpts)
    report = (tmp_path / "report" / "report.md").read_text()
    cells = _stage_table(report)
    expected = {f"{s}/{m}_2of4": _size(R / m / "2of4" / s) for s in ("prune1", "prune1_adjust")
                for m in ("sparsegpt", "wanda")}
    assert {k: _exact(v) for k, v in cells.items() if _exact(v) is not None} == expected
    assert expected["prune1/sparsegpt_2of4"] > expected["prune1/wanda_2of4"]
    assert cells["report/report"] == "–", "the report's own output is not finished yet"
    weights = (tmp_path / "model" / "model.safetensors").stat().st_size
    rows = _multiple_rows(report)
    mine = expected["prune1/sparsegpt_2of4"] + expected["prune1_adjust/sparsegpt_2of4"]
    assert rows["sparsegpt 2:4"] == (mine, f"{mine / weights:.2f}×")
    assert rows["**total**"][0] == sum(expected.values())
    saved = json.loads((tmp_path / "report" / "bytes.json").read_text())
    assert saved == {"stages": expected, "model_weights": weights}


def test_the_pipelines_report_states_the_bytes_each_stage_wrote(micro_run):
    """The micro run's own report (paths relative to Snakemake's working folder, the real benchmark names):
    every job's bytes are its output's size; the totals are their sums and multiples of the model's weights."""
    work, _, _ = micro_run
    R = work / "results" / "micro"
    report = (R / "report" / "report.md").read_text()
    cells = _stage_table(report)
    outputs = {"corpus/corpus": R / "corpus", "build_model/build_model": R / "model",
               "calibration/calibration": R / "calibration.parquet",
               "layer_inputs/layer_inputs": R / "activations" / "input",
               "zeroshot_tasks/zeroshot_tasks": R / "tasks", "evaluate/dense": R / "eval" / "dense.json",
               "prune1/sparsegpt_2of4": R / "sparsegpt" / "2of4" / "prune1",
               "prune1_adjust/sparsegpt_2of4": R / "sparsegpt" / "2of4" / "prune1_adjust",
               "reconstruct/sparsegpt_2of4_default": R / "sparsegpt" / "2of4" / "default" / "reconstruct",
               "prune2/sparsegpt_2of4_default": R / "sparsegpt" / "2of4" / "default" / "sds",
               "evaluate/sparsegpt_2of4_prune1": R / "eval" / "sparsegpt" / "2of4" / "prune1.json",
               "evaluate/sparsegpt_2of4_prune1_adjust": R / "eval" / "sparsegpt" / "2of4" / "prune1_adjust.json",
               "evaluate/sparsegpt_2of4_default_sds": R / "eval" / "sparsegpt" / "2of4" / "default" / "sds.json"}
    assert set(cells) == set(outputs), "the report's own benchmark is written after it"
    assert {job: _exact(cells[job]) for job in outputs} == {job: _size(p) for job, p in outputs.items()}
    weights = sum(f.stat().st_size for f in (R / "model").glob("*.safetensors"))
    rows = _multiple_rows(report)
    mine = sum(_size(p) for job, p in outputs.items() if "sparsegpt" in job)
    assert rows["sparsegpt 2:4"] == (mine, f"{mine / weights:.2f}×")
    assert rows["(shared)"][0] + mine == rows["**total**"][0] == sum(_size(p) for p in outputs.values())


# --- one unit, wide ranges, pipeline order, captions true to the data, zero-shot off, MLflow's view ------------


def _ppl_rows(md: str, ds: str) -> list[dict]:
    """The rows of report.md's perplexity table for `ds`, by column name."""
    section = md.split(f"## Perplexity on `{ds}`", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_the_tables_and_ppl_png_share_one_unit_with_absolute_perplexity_beside(rendered):
    """Every one-shot / adjust / SDS cell of the perplexity tables is the increase over dense in %, written as
    the bar of ppl.png that draws that checkpoint labels it; the PPL columns are summary.csv's perplexities."""
    root, _, _, plots = rendered
    md = (root / "report" / "report.md").read_text()
    rows = list(csv.DictReader((root / "summary.csv").open()))
    panels = {ax.get_title(loc="left").split(":")[0]: ax for ax in plots["ppl.png"].axes}
    stages = {"one-shot": "prune1", "one-shot + adjust": "prune1+adjust", "SDS": "sds"}
    for ds, ax in panels.items():
        dense = next(float(r["ppl"]) for r in rows if r["stage"] == "dense" and r["dataset"] == ds)
        labels = {t.get_text() for t in ax.texts}
        bars = drawn_bars(ax)
        table = _ppl_rows(md, ds)
        assert len(table) == 3 * 3
        for row in table:
            for column, stage in stages.items():
                ppl = next(float(r["ppl"]) for r in rows if (r["dataset"], r["method"], r["pattern"], r["stage"])
                           == (ds, row["method"], row["pattern"], stage))
                assert row[f"PPL {column}"] == f"{ppl:.3f}"
                assert f"{row[column]} ({row[f'PPL {column}']})" in labels, (ds, row, column)
                recon = row["recon"] if stage == "sds" else ""
                drawn = bars[f"{row['method']}|{row['pattern']}|{stage}|{recon}"]
                assert float(row[column].rstrip("%")) == pytest.approx(drawn, abs=0.06)
                assert drawn == pytest.approx(100 * (ppl / dense - 1), abs=1e-3)
            assert float(row["SDS − one-shot, points"]) == pytest.approx(
                float(row["SDS"].rstrip("%")) - float(row["one-shot"].rstrip("%")), abs=0.11)
    assert "in % of the dense perplexity" in md and "logarithmic" not in md  # this run's range fits a linear axis
    assert all(ax.get_xscale() == "linear" for ax in panels.values())


def _rewrite_eval(path, **changes):
    record = json.loads(open(path).read())
    record.update(changes)
    write_json(path, record, output=True)


def test_one_wide_bar_puts_the_perplexity_axis_on_a_log_scale_and_the_caption_says_so(tmp_path):
    """One checkpoint at +6232 % among ones near +10 % (magnitude against Wanda on SmolLM2): the x axis turns
    symmetric-log, every bar keeps its exact value, and the small bars stay readable (a linear axis would
    draw +10 % in 1/600 of the widest bar)."""
    cfg, evals, benchmarks, ckpts, model_dir = run = synthetic_run(tmp_path, n_methods=3, n_patterns=1, layers=2,
                                                                   datasets=("builtin",))
    wide = next(p for p in evals if "/magnitude/" in p and p.endswith("prune1.json"))
    _rewrite_eval(wide, ppl={"builtin": 20.0 * 63.32})
    fig = _figures(run)["ppl.png"]
    (ax,) = fig.axes
    assert ax.get_xscale() == "symlog"
    bars = drawn_bars(ax)
    assert bars["magnitude|2:4|prune1|"] == pytest.approx(6232.0)
    fig.canvas.draw()

    def px(value):
        x0, x1 = ax.transData.transform([(0, 0), (value, 0)])[:, 0]
        return x1 - x0

    small = [v for k, v in bars.items() if v > 0 and not k.startswith("magnitude|2:4|prune1")]
    assert min(px(v) for v in small) > 0.1 * px(6232.0)
    assert overlapping_texts(fig) == [] and clipped_texts(fig) == []
    build_report(cfg, evals, benchmarks, tmp_path / "report", tmp_path / "summary.csv", model_dir, ckpts)
    md = (tmp_path / "report" / "report.md").read_text()
    caption = md.split("](ppl.png)", 1)[1].split("\n\n", 2)[1]
    assert "logarithmic beyond" in caption and "+6232.0%" in caption
    assert "| magnitude | 2:4 | default | +6232.0% |" in md


def test_seconds_table_and_chart_follow_the_pipeline(tmp_path):
    cfg, evals, benchmarks, ckpts, model_dir = synthetic_run(tmp_path, n_methods=1, n_patterns=1, layers=2)
    R = tmp_path / "results" / "t" / "benchmarks"
    extra = [("report", "report"), ("evaluate", "sparsegpt_2of4_default_sds"), ("evaluate", "dense"),
             ("evaluate", "sparsegpt_2of4_prune1_adjust"), ("evaluate", "sparsegpt_2of4_prune1"),
             ("prune2", "sparsegpt_2of4_default"), ("reconstruct", "sparsegpt_2of4_default"),
             ("layer_inputs", "layer_inputs"), ("build_model", "build_model"), ("zeroshot_tasks", "zeroshot_tasks"),
             ("corpus", "corpus")]
    for stage, job in extra:  # written in an order the pipeline's is not
        (R / stage).mkdir(parents=True, exist_ok=True)
        (R / stage / f"{job}.tsv").write_text("s\th:m:s\tmax_rss\n1.5\t0:00:01\t100\n")
        benchmarks.append(str(R / stage / f"{job}.tsv"))
    benchmarks.reverse()
    build_report(cfg, evals, benchmarks, tmp_path / "report", tmp_path / "summary.csv", model_dir, ckpts)
    md = (tmp_path / "report" / "report.md").read_text()
    jobs = list(_stage_table(md))
    pipeline = ["corpus", "build_model", "calibration", "layer_inputs", "activations", "prune1", "prune1_adjust",
                "reconstruct", "prune2", "zeroshot_tasks", "evaluate", "report"]
    assert list(dict.fromkeys(j.split("/")[0] for j in jobs)) == pipeline
    evaluations = [j for j in jobs if j.startswith("evaluate/")]  # dense, then as the checkpoints are made
    assert evaluations[:4] == ["evaluate/dense", "evaluate/sparsegpt_2of4_prune1",
                               "evaluate/sparsegpt_2of4_prune1_adjust", "evaluate/sparsegpt_2of4_default_sds"]
    seconds = _figures((cfg, evals, benchmarks, ckpts, model_dir))["seconds.png"]
    assert [t.get_text() for t in seconds.axes[0].get_yticklabels()] == pipeline


def _set_weight(ckpt, tensor):
    save_tensors(ckpt / "weights.safetensors", {HIST_KEY: tensor})


@pytest.mark.parametrize("refit", ["sparser", "denser"])
def test_the_histogram_caption_counts_the_non_zeros_each_curve_draws(tmp_path, refit):
    """The caption and the legend state each curve's non-zero count, and whether the dense reconstruction
    re-filled or removed weights against the first prune: computed from the tensors, true either way."""
    cfg, evals, benchmarks, ckpts, model_dir = run = synthetic_run(tmp_path, n_methods=1, n_patterns=1, layers=2)
    g = torch.Generator().manual_seed(1)
    R = tmp_path / "results" / "t" / "sparsegpt" / "2of4"
    dense = torch.randn(16, 8, generator=g)
    keep = (torch.rand(16, 8, generator=g) < 0.5)
    first = dense * keep
    regrow = torch.rand(16, 8, generator=g) < (0.2 if refit == "sparser" else 0.9)
    shrink = torch.rand(16, 8, generator=g) < (0.6 if refit == "sparser" else 0.1)
    recon = torch.randn(16, 8, generator=g) * ((keep & ~shrink) | (~keep & regrow))
    sds = dense * (torch.rand(16, 8, generator=g) < 0.5)
    for stage, W in (("prune1", first), ("default/reconstruct", recon), ("default/sds", sds)):
        _set_weight(R / stage, W)
    fig = _figures(run)["histograms.png"]
    count = {name: int((W != 0).sum()) for name, W in (("prune1", first), ("reconstruct", recon), ("sds", sds))}
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[1:] == [f"{name}: {n:,} of 128 non-zero" for name, n in count.items()]
    build_report(cfg, evals, benchmarks, tmp_path / "report", tmp_path / "summary.csv", model_dir, ckpts)
    caption = (tmp_path / "report" / "report.md").read_text().split("](histograms.png)", 1)[1]
    filled, removed = int(((recon != 0) & (first == 0)).sum()), int(((recon == 0) & (first != 0)).sum())
    assert f"prune1 {count['prune1']} of 128; reconstruct {count['reconstruct']} of 128" in caption
    net = count["reconstruct"] - count["prune1"]
    verdict = (f"{-net} fewer non-zeros than the first prune (sparser, not re-filled)" if refit == "sparser" else
               f"{net} more non-zeros than the first prune (denser)")
    assert (f"The dense reconstruction holds {verdict}, {100 * count['reconstruct'] / 128:.1f} % non-zero against "
            f"{100 * count['prune1'] / 128:.1f} %: it re-filled {filled} of the {128 - count['prune1']} positions the "
            f"first prune removed and set {removed} of the {count['prune1']} weights it kept to zero.") in caption
    assert (net < 0) == (refit == "sparser")


def test_a_run_without_zero_shot_says_so(tmp_path):
    cfg, evals, benchmarks, ckpts, model_dir = synthetic_run(tmp_path, n_methods=1, n_patterns=1, layers=2)
    for path in evals:
        record = json.loads(open(path).read())
        record.pop("zeroshot")
        write_json(path, record, output=True)
    cfg = validate_config({"run": "t", "evaluate": {"datasets": {"builtin": "builtin", "held_out": "builtin"},
                                                    "zeroshot": {"enabled": False}}})
    build_report(cfg, evals, benchmarks, tmp_path / "report", tmp_path / "summary.csv", model_dir, ckpts)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "zero-shot: off (`evaluate.zeroshot.enabled: false`)" in md
    assert "## Zero-shot accuracy" not in md and "zeroshot.png" not in md


def test_report_html_carries_every_figure_inline_for_mlflows_view(rendered):
    """report.html (an artifact beside report.md) holds report.md's text, tables and every PNG it links, as
    data: URIs with the PNG's exact bytes (MLflow renders .html in an iframe, where data: images show)."""
    import base64
    import re

    root, _, artifacts, _ = rendered
    page = (root / "report" / "report.html").read_text()
    assert str(root / "report" / "report.html") in artifacts
    md = (root / "report" / "report.md").read_text()
    linked = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == len(linked) == len(FIGURES)
    for name, src in zip(linked, sources):
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == (root / "report" / name).read_bytes()
    tables = sum(1 for line in md.splitlines() if line.startswith("|---|"))
    assert page.count("<table>") == tables > 3 and "zero-shot: on" in page
