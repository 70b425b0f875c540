"""A user's own checkpoint, end to end: OPT- and LLaMA-architecture models trained by the builder, saved as
plain save_pretrained folders outside results/, run through every stage of the real workflow with
`model.source` set to each folder and text files given by path."""
import csv
import hashlib
import os
import shutil

import pytest
import torch
import yaml

from conftest import ROOT, built_once, planned_jobs, snakemake

# What each family is run with: every (method, pattern) must come out with exactly the configured sparsity.
RUNS = {
    "opt": {"methods": ["sparsegpt"], "patterns": ["2:4", "unstructured:0.7"]},
    "llama": {"methods": ["wanda"], "patterns": ["4:8"]},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """OPT and LLaMA checkpoints trained on the generated corpus, and that corpus as two text files."""
    built_once(tmp_path_factory, "test_external.checkpoints")
    from sds.demo.corpus import builtin_splits
    from sds.demo.builder import build_model

    root = tmp_path_factory.mktemp("user")
    splits = builtin_splits(150, 20, seed=1)
    (root / "data").mkdir()
    for name, text in splits.items():
        (root / "data" / f"{name}.txt").write_text(text)
    for arch in RUNS:
        build_model(splits["train"], root / "models" / arch, vocab_size=300, layers=2, hidden=32, ffn=64, heads=4,
                    max_positions=128, steps=40, batch_size=8, seqlen=64, lr=0.003, seed=0, architecture=arch)
    return root


def _config(root, arch: str) -> dict:
    return {"run": f"user_{arch}", "threads": 1,
            "model": {"source": str(root / "models" / arch)},
            "calibration": {"source": str(root / "data" / "train.txt"), "nsamples": 4, "seqlen": 64},
            "prune": RUNS[arch], "reconstruct": {"default": {"steps": 10}},
            "evaluate": {"seqlen": 64, "max_windows": 4, "datasets": {"gen": str(root / "data" / "test.txt")},
                         "zeroshot": {"enabled": False}},
            "mlflow": {"enabled": False}}


@pytest.fixture(scope="module")
def user_runs(checkpoints):
    """Both families through every stage and the export target, in one working directory."""
    work = checkpoints / "work"
    work.mkdir()
    configs = {}
    for arch in RUNS:
        configs[arch] = work / f"{arch}.yaml"
        configs[arch].write_text(yaml.safe_dump(_config(checkpoints, arch)))
        snakemake(work, "--cores", "2", "--configfile", str(configs[arch]), "--", "all", "export")
    return work, configs


def test_every_stage_ran_on_both_families(user_runs, checkpoints):
    from sds.core.patterns import parse_pattern

    work, _ = user_runs
    rows = list(csv.DictReader((work / "results" / "summary.csv").open()))
    for arch, spec in RUNS.items():
        r = work / "results" / f"user_{arch}"
        assert (r / "calibration.parquet").is_file()
        assert sorted(p.name for p in (r / "activations" / "input").glob("*.parquet")) == ["layer_000.parquet"]
        assert not (r / "activations" / "dense").exists(), "the default settings never read the dense cache"
        for method in spec["methods"]:
            for pattern in spec["patterns"]:
                slug = parse_pattern(pattern).slug
                base = r / method / slug
                for stage in ("prune1", "prune1_adjust", "default/reconstruct"):
                    assert (base / stage / "weights.safetensors").is_file(), f"{arch} {stage}"
                assert (base / "default" / "sds" / "model" / "model.safetensors").is_file()
        assert (r / "report" / "report.md").is_file()
        mine = [row for row in rows if row["model"] == str(checkpoints / "models" / arch)]
        stages = {(row["method"], row["pattern"], row["stage"]) for row in mine}
        expected = {(m, str(parse_pattern(p)), s) for m in spec["methods"] for p in spec["patterns"]
                    for s in ("prune1", "prune1+adjust", "sds")}
        assert expected <= stages, f"{arch}: summary rows {sorted(stages)}"
        assert any(row["stage"] == "dense" for row in mine)


def expected_zeros(method: str, pattern, weight: torch.Tensor) -> int:
    """The zeros a pattern asks of one weight matrix: M−N per group of M; for unstructured ratios the
    floor of ratio × the comparison group (Wanda compares within each row, the others over the matrix)."""
    rows, cols = weight.shape
    if pattern.kind == "nm":
        return rows * cols // pattern.m * (pattern.m - pattern.n)
    if method == "wanda":
        return rows * int(pattern.ratio * cols)
    return int(pattern.ratio * rows * cols)


def _loaded(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("arch", list(RUNS))
def test_every_checkpoint_is_a_loadable_folder_with_the_configured_sparsity(user_runs, arch):
    """prune1, prune1+adjust (the export target) and SDS: each loads with from_pretrained, generates, and has
    exactly the zeros the pattern asks of every decoder linear, with every N:M group valid."""
    from sds.evaluation.perplexity import pattern_violations
    from sds.model.decoder import decoder_layers, find_linears
    from sds.core.patterns import parse_pattern

    work, _ = user_runs
    r = work / "results" / f"user_{arch}"
    for method in RUNS[arch]["methods"]:
        for text in RUNS[arch]["patterns"]:
            pattern = parse_pattern(text)
            folders = [r / "export" / method / pattern.slug / s / "model" for s in ("prune1", "prune1_adjust")]
            folders.append(r / method / pattern.slug / "default" / "sds" / "model")
            for folder in folders:
                model, tok = _loaded(folder)
                assert type(model).__name__.lower().startswith(arch)
                for layer in decoder_layers(model):
                    for name, linear in find_linears(layer).items():
                        zeros = int((linear.weight == 0).sum())
                        assert zeros == expected_zeros(method, pattern, linear.weight), f"{folder} {name}"
                assert pattern_violations(model, pattern) == 0
                assert (folder.parent / "masks.safetensors").is_file()
                assert "sparsity" in (folder / "README.md").read_text()
                ids = tok("the ship", return_tensors="pt")["input_ids"]
                out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                assert out.shape[1] == ids.shape[1] + 8


def _tree_digest(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def test_dry_run_writes_nothing_and_new_weights_rerun_calibration_onward(user_runs, checkpoints):
    work, configs = user_runs
    before = _tree_digest(work / "results")
    proc = snakemake(work, "-n", "--configfile", str(configs["opt"]), "--", "all", "export")
    assert planned_jobs(proc.stdout) == set(), "an unchanged run is a no-op"
    assert _tree_digest(work / "results") == before, "a dry run must not touch results/"

    weights = checkpoints / "models" / "opt" / "model.safetensors"
    saved = weights.with_suffix(".orig")
    shutil.copy2(weights, saved)
    try:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in tensors.items()}, str(weights),
                  metadata={"format": "pt"})
        jobs = planned_jobs(snakemake(work, "-n", "--configfile", str(configs["opt"]), "--", "all", "export").stdout)
        assert jobs == {"calibration", "layer_inputs", "prune1", "prune1_adjust", "reconstruct", "prune2",
                        "evaluate_dense", "evaluate_prune1", "evaluate_sds", "report", "export_checkpoint",
                        "all", "export"}
        # the other family's run does not read these weights: nothing of it re-runs
        assert planned_jobs(snakemake(work, "-n", "--configfile", str(configs["llama"])).stdout) == set()
    finally:
        os.replace(saved, weights)  # copy2 kept the old mtime: the run is up to date again
    assert planned_jobs(snakemake(work, "-n", "--configfile", str(configs["opt"])).stdout) == set()
    assert _tree_digest(work / "results") == before


def test_hub_id_is_read_from_the_local_cache_or_named(checkpoints, tmp_path):
    """A Hugging Face id found in the local cache resolves to its snapshot (nothing downloaded); a missing
    id stops the run before any work, in one line naming it."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(checkpoints / "models" / "llama", snapshot)
    (cache / "models--someone--tiny-llama" / "refs").mkdir()
    (cache / "models--someone--tiny-llama" / "refs" / "main").write_text("0" * 40)
    cfg = _config(checkpoints, "llama")
    cfg["model"]["source"] = "someone/tiny-llama"
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(cfg))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "hub.yaml"), env=env)
    assert "prune2" in planned_jobs(proc.stdout)
    assert str(snapshot) in proc.stdout, "stages read the cached snapshot folder"

    cfg["model"]["source"] = "someone/absent-model"
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "--cores", "1", "--configfile", str(tmp_path / "missing.yaml"), env=env, check=False)
    assert proc.returncode != 0
    assert "'someone/absent-model' is neither a local folder nor in the local Hugging Face cache" in proc.stderr
    assert not (tmp_path / "results").exists()


def _documented_config(name: str) -> dict:
    if name == "readme":  # the example config of the README's "Prune your own model"
        section = (ROOT / "README.md").read_text().split("## Prune your own model", 1)[1]
        return yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    return yaml.safe_load((ROOT / "config" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", ["opt125m", "smollm2", "readme"])
def test_documented_configs_validate_and_build_their_dag(name, checkpoints, tmp_path):
    """The configs the README documents, with their model and data paths pointed at stand-ins of the same
    kind (CI has neither OPT-125M nor SmolLM2): every other key is theirs, validated, and their DAG builds."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    cfg = _documented_config(name)
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    if name == "opt125m":
        model = OPTForCausalLM(OPTConfig(vocab_size=300, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                         num_attention_heads=2, max_position_embeddings=2048, word_embed_proj_dim=16))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, num_hidden_layers=2,
                                             intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=2048))
    model.save_pretrained(model_dir)
    shutil.copy(checkpoints / "models" / "opt" / "tokenizer.json", model_dir)
    cfg["model"]["source"] = str(model_dir)
    text = checkpoints / "data" / "test.txt"
    cfg["calibration"]["source"] = str(text)
    cfg["evaluate"]["datasets"] = {name: str(text) for name in cfg["evaluate"]["datasets"]}
    zs = cfg["evaluate"].get("zeroshot", {})
    if zs.get("enabled", True) and zs.get("data_dir"):
        from sds.core.tasksets import resolve_tasks, task_spec

        zs["data_dir"] = str(tmp_path / "zeroshot")
        for task in resolve_tasks(zs["tasks"]):
            for rel in task_spec(task)["dataset_kwargs"]["data_files"].values():
                f = tmp_path / "zeroshot" / rel
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text("{}\n")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    jobs = planned_jobs(snakemake(tmp_path, "-n", "--configfile", str(path)).stdout)
    assert {"calibration", "layer_inputs", "prune1", "reconstruct" if not cfg.get("layer_parallel") else
            "reconstruct_gather", "prune2", "evaluate_sds", "report"} <= jobs
    assert not (tmp_path / "results").exists(), "a dry run writes nothing"
