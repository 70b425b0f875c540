"""Every checkpoint's layers.json records each linear's density and max|W| / max|W_dense|, and the report
states them per checkpoint with a check line that flags any linear past 2× the dense layer's largest weight."""
import json

import pytest

from sds.report.inputs import checkpoint_of, weight_figures
from sds.report.report import build_report
from sds.report.weight_checks import linear_label, weight_section
from sds.storage.safetensors import TensorReader
from test_report import synthetic_run


def _section(report: str) -> str:
    return report.split("## Density and weight range of the linears", 1)[1].split("\n## ", 1)[0]


def _rows(section: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| method")]


# --- the pipeline's own checkpoints (the micro run) ------------------------------------------------------------

CHECKPOINTS = {"prune1": "prune1", "prune1_adjust": "prune1_adjust", "reconstruct": "default/reconstruct",
               "sds": "default/sds"}


def test_every_checkpoint_records_each_linears_density_and_weight_range(micro_run):
    """layers.json's density and max_abs_ratio equal what the checkpoint's weights hold, recomputed here from
    its weights.safetensors and the dense model: for the first prune, the adjustment, the dense
    reconstruction and SDS."""
    work, _, _ = micro_run
    run = work / "results" / "micro"
    dense = TensorReader(run / "model" / "model.safetensors", device="cpu")
    for stage, folder in CHECKPOINTS.items():
        path = run / "sparsegpt" / "2of4" / folder
        linears = json.loads((path / "layers.json").read_text())["linears"]
        reader = TensorReader(path / "weights.safetensors", device="cpu")
        try:
            assert set(linears) == set(reader.keys()), stage
            for name, info in linears.items():
                W = reader[name].float()
                assert info["density"] == pytest.approx(float((W != 0).float().mean()), abs=1e-12), (stage, name)
                ratio = float(W.abs().max() / dense[name].float().abs().max())
                assert info["max_abs_ratio"] == pytest.approx(ratio, rel=1e-6), (stage, name)
                if stage != "reconstruct":  # the sparse checkpoints keep 2 of every 4
                    assert info["density"] <= 0.5 + 1e-9, (stage, name)
        finally:
            reader.close()
    dense.close()
    report = (run / "report" / "report.md").read_text()
    rows = {r[3]: r for r in _rows(_section(report))}
    assert set(rows) == {"one-shot", "one-shot + adjust", "dense reconstruction", "SDS"}
    recon = json.loads((run / "sparsegpt" / "2of4" / "default" / "reconstruct" / "layers.json").read_text())["linears"]
    mean = sum(i["density"] for i in recon.values()) / len(recon)
    assert rows["dense reconstruction"][5] == f"{100 * mean:.1f} %"
    assert "**Check passed**" in report or "**Check FAILED**" in report


# --- the report's section, from synthetic checkpoints -----------------------------------------------------------

def _set_figures(ckpt: str, density, ratio) -> None:
    """Gives every linear of the checkpoint folder's layers.json these figures (callables of the name's index)."""
    path = f"{ckpt}/layers.json"
    record = json.loads(open(path).read())
    for k, name in enumerate(sorted(record["linears"])):
        record["linears"][name].update(density=density(k), max_abs_ratio=ratio(k))
    with open(path, "w") as fh:
        json.dump(record, fh)


@pytest.fixture
def run(tmp_path):
    """A one-method, one-pattern synthetic run with 2 decoder layers (12 linears) per checkpoint."""
    cfg, evals, benchmarks, ckpts, model_dir = synthetic_run(tmp_path, n_methods=1, n_patterns=1, layers=2)
    by_stage = {checkpoint_of(c).stage: c for c in ckpts}
    return tmp_path, cfg, evals, benchmarks, ckpts, model_dir, by_stage


def _report(run) -> str:
    root, cfg, evals, benchmarks, ckpts, model_dir, _ = run
    build_report(cfg, evals, benchmarks, root / "report", root / "summary.csv", model_dir, ckpts)
    return (root / "report" / "report.md").read_text()


def test_the_report_states_mean_and_min_density_and_the_peak_ratio_per_checkpoint(run):
    by_stage = run[-1]
    _set_figures(by_stage["prune1"], lambda k: 0.5, lambda k: 1.0 + k / 100)  # peak: the 12th linear, 1.11×
    _set_figures(by_stage["prune1+adjust"], lambda k: 0.5 - (k == 3) * 0.1, lambda k: 1.3)
    _set_figures(by_stage["reconstruct"], lambda k: 0.3 + k / 100, lambda k: 0.9)  # mean 0.355, sparser
    _set_figures(by_stage["sds"], lambda k: 0.5, lambda k: 1.9 - (k != 7) * 0.5)
    names = sorted(json.loads(open(f"{by_stage['prune1']}/layers.json").read())["linears"])
    section = _section(_report(run))
    rows = {r[3]: r for r in _rows(section)}
    assert list(rows) == ["one-shot", "one-shot + adjust", "dense reconstruction", "SDS"]  # the pipeline's order
    assert rows["one-shot"][4:] == ["12", "50.0 %", f"50.0 % (`{linear_label(names[0])}`)",
                                    f"1.11× (`{linear_label(names[11])}`)", "0"]
    assert rows["one-shot + adjust"][6] == f"40.0 % (`{linear_label(names[3])}`)"
    assert rows["dense reconstruction"][5:7] == ["35.5 %", f"30.0 % (`{linear_label(names[0])}`)"]
    assert rows["SDS"][7] == f"1.90× (`{linear_label(names[7])}`)"
    assert f"**Check passed**: every linear of every checkpoint keeps `max|W|` within 2× the dense layer's " \
           f"(largest 1.90×, `{linear_label(names[7])}` of sparsegpt 2:4 SDS)." in section
    assert "the dense reconstruction's linears hold 35.5 % non-zero weights on average, the first prune's " \
           "50.0 %: sparser than the first prune" in section


def test_the_check_line_flags_every_linear_over_twice_the_dense_maximum(run):
    by_stage = run[-1]
    for stage in ("prune1", "prune1+adjust"):
        _set_figures(by_stage[stage], lambda k: 0.5, lambda k: 1.0)
    _set_figures(by_stage["reconstruct"], lambda k: 0.7, lambda k: 1.0)
    _set_figures(by_stage["sds"], lambda k: 0.5, lambda k: {4: 77.0, 9: 2.5}.get(k, 1.0))
    names = sorted(json.loads(open(f"{by_stage['sds']}/layers.json").read())["linears"])
    section = _section(_report(run))
    assert "**Check passed**" not in section
    assert (f"**Check FAILED**: 2 linears hold a weight over 2× the dense layer's largest: sparsegpt 2:4 SDS "
            f"(default) `{linear_label(names[4])}` 77.00×; sparsegpt 2:4 SDS (default) `{linear_label(names[9])}` "
            "2.50×.") in section
    assert {r[3]: r[8] for r in _rows(section)}["SDS"] == "2"
    _set_figures(by_stage["sds"], lambda k: 0.5, lambda k: 2.01 if k == 0 else 1.0)
    assert f"**Check FAILED**: 1 linear holds a weight over 2× the dense layer's largest: sparsegpt 2:4 SDS " \
           f"(default) `{linear_label(names[0])}` 2.01×." in _section(_report(run))
    assert "70.0 % non-zero weights on average, the first prune's 50.0 %: denser than the first prune" in section


def test_checkpoints_without_the_figures_leave_the_section_out(run):
    _, _, _, _, ckpts, _, _ = run
    assert weight_figures([checkpoint_of(c) for c in ckpts]) == []  # synthetic_run records errors only
    assert weight_section([]) == []
    assert "## Density and weight range" not in _report(run)


def test_linear_labels_name_the_layer_and_the_linear():
    assert linear_label("model.decoder.layers.3.fc1.weight") == "layer 3 fc1"
    assert linear_label("model.layers.21.mlp.up_proj.weight") == "layer 21 mlp.up_proj"
    assert linear_label("lm_head.weight") == "lm_head.weight"
