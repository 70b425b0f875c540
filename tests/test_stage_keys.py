"""Changing a config key re-runs exactly the stages that read it and what follows them, no other: for every key
of the table in src/sds/core/stage_keys.py (one leaf of each section the table lists whole), a dry run of a
finished micro run with that one value changed plans exactly the rules the table names as its readers and
the rules downstream of them in the rule graph. The readers are taken from the table, the downstream rules
from Snakemake's own rule graph, the jobs from Snakemake's dry run; and a stage that reads a key the table
does not list fails (the CLI hands it only its slice)."""
import copy
import json
import os
import re
import subprocess

import pytest
import yaml

from conftest import LOCAL_PATH, ROOT, SNAKEMAKE, copy_run, planned_jobs, snakemake

# Values a changed string takes (other strings, and keys that change which rules exist, are not changed:
# a new model or text source, the dense_stream target and dense inputs add rules; zero-shot on/off too).
ALTERNATIVES = {"device": "cpu", "forward_batch": 1, "model.dtype": "bfloat16", "activations.dtype": "float32",
                "activations.compression": "zstd", "prune2.selection": "pruner", "prune2.adjust": "exact",
                "solver": "fista"}
DAG_CHANGING = ("model.source", "calibration.source", "evaluate.datasets", "evaluate.zeroshot.enabled",
                "evaluate.zeroshot.tasks", "evaluate.zeroshot.data_dir", "prune2.adjust_target",
                "model.builtin.hidden", "model.builtin.heads", "model.builtin.kv_heads", "model.builtin.corpus.source")


def _resolved():
    from sds.core.config import validate_config

    return validate_config(yaml.safe_load((ROOT / "config" / "micro.yaml").read_text()))


def _lookup(config, key):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _new_value(leaf: str, value):
    """The value `leaf` is changed to, or None where no change keeps the run's rules as they are."""
    if any(leaf == k or leaf.startswith(k + ".") for k in DAG_CHANGING) or leaf.endswith((".inputs", ".target")):
        return None
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 if value else 0.5
    for suffix, alternative in ALTERNATIVES.items():
        if leaf == suffix or leaf.endswith("." + suffix):
            return alternative if alternative != value else None
    return None


def _leaves(config, key, value):
    """(leaf key, value) under `key`, in name order; a setting's empty `prune2` overrides give `fallback`."""
    if isinstance(value, dict):
        if not value and key.endswith(".prune2"):
            yield f"{key}.fallback", config["prune2"]["fallback"]
        for sub in sorted(value):
            yield from _leaves(config, f"{key}.{sub}", value[sub])
    else:
        yield key, value


def _jobs(config):
    """(stage, wildcards) of every job of the micro run's graph, from its config."""
    recons = list(config["reconstruct"])
    jobs = [("corpus", {}), ("build_model", {}), ("calibration", {}), ("layer_inputs", {}), ("zeroshot_tasks", {}),
            ("evaluate", {}), ("report", {})]
    for method in config["prune"]["methods"]:
        jobs += [("prune1", {"method": method}), ("prune1_adjust", {})]
        jobs += [(s, {"method": method, "recon": r}) for r in recons for s in ("reconstruct", "prune2")]
    return jobs


RULES_OF = {"evaluate": ("evaluate_dense", "evaluate_prune1", "evaluate_sds")}


def _readers(config, leaf: str) -> set[str]:
    from sds.core.stage_keys import stage_keys

    found = set()
    for stage, wildcards in _jobs(config):
        keys = stage_keys(config, stage, **wildcards)
        if any(leaf == k or leaf.startswith(k + ".") for k in keys):
            found.update(RULES_OF.get(stage, (stage,)))
    return found


def _cases():
    """(leaf key, new value) for each key of the table that the micro run's stages read."""
    from sds.core.stage_keys import stage_keys

    config = _resolved()
    keys = dict.fromkeys(k for stage, wc in _jobs(config) for k in stage_keys(config, stage, **wc))
    cases = {}
    for key in keys:  # the first leaf of each listed key not already changed for another
        for leaf, value in _leaves(config, key, _lookup(config, key)):
            new = _new_value(leaf, value)
            if new is not None and leaf not in cases:
                cases[leaf] = new
                break
    return list(cases.items())


def _set(config, leaf, value):
    node = config
    parts = leaf.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _downstream(rulegraph: str, rules: set[str]) -> set[str]:
    names = dict(re.findall(r'^\s*(\d+)\[label = "(\w+)"', rulegraph, re.M))
    children: dict[str, set[str]] = {}
    for a, b in re.findall(r"^\s*(\d+) -> (\d+)", rulegraph, re.M):
        children.setdefault(names[a], set()).add(names[b])
    out, todo = set(rules), list(rules)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _dry_run(work, configfile) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "-d", str(work), "-n", "--cores", "2", "--configfile", str(configfile)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": LOCAL_PATH, "MLFLOW_TRACKING_URI": ""})


@pytest.fixture(scope="module")
def finished(micro_run, tmp_path_factory):
    """A copy of the finished micro run (mtimes and Snakemake's records kept), its rule graph and config."""
    copy_dir = copy_run(micro_run, tmp_path_factory.mktemp("keys"))
    config = yaml.safe_load(micro_run[1].read_text())
    base = copy_dir / "base.yaml"
    base.write_text(yaml.safe_dump(config))
    if planned_jobs(_dry_run(copy_dir, base).stdout):  # an earlier test left it unfinished
        snakemake(copy_dir, "--cores", "2", "--configfile", str(base))
    check = _dry_run(copy_dir, base)
    assert check.returncode == 0 and planned_jobs(check.stdout) == set(), check.stdout[-2000:] + check.stderr[-2000:]
    graph = subprocess.run([*SNAKEMAKE, "-d", str(copy_dir), "--rulegraph", "--configfile", str(base)],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "PATH": LOCAL_PATH}).stdout
    return copy_dir, config, graph


CASES = _cases()


def test_the_cases_cover_the_table():
    leaves = [leaf for leaf, _ in CASES]
    for key in ("seed", "threads", "device", "model.dtype", "forward_batch", "prune.blocksize", "prune.percdamp",
                "prune.admm_iters", "prune2.adjust_iters", "prune2.admm_percdamp", "reconstruct.default.l1",
                "reconstruct.default.prune2.fallback", "calibration.nsamples", "evaluate.max_windows",
                "report.histogram_layer", "evaluate.zeroshot.builtin_items", "model.builtin.batch_size"):
        assert key in leaves, f"{key} is not among the generated cases"


@pytest.mark.parametrize("leaf,value", CASES, ids=[leaf for leaf, _ in CASES])
def test_changing_a_key_reruns_exactly_its_readers_and_what_follows(finished, leaf, value):
    work, config, graph = finished
    changed = copy.deepcopy(config)
    _set(changed, leaf, value)
    path = work / f"changed-{leaf}.yaml"
    path.write_text(yaml.safe_dump(changed))
    proc = _dry_run(work, path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from sds.core.config import validate_config

    expected = _downstream(graph, _readers(validate_config(changed), leaf) | _readers(_resolved(), leaf))
    assert planned_jobs(proc.stdout) == expected, f"{leaf} = {json.dumps(value)}"


def test_a_stage_reading_a_key_it_is_not_listed_with_fails():
    from sds.core.stage_keys import stage_config

    sliced = stage_config(_resolved(), "prune1_adjust")
    assert "prune" not in sliced and sliced["activations"]["row_group_size"] == 8
    with pytest.raises(KeyError, match="stage 'prune1_adjust' read config key 'prune'"):
        sliced["prune"]
    assert stage_config(_resolved(), "prune1", method="wanda")["prune"] == {"sparsity_profile": "uniform"}
    assert stage_config(_resolved(), "prune1", method="sparsegpt")["prune"] == {"blocksize": 128, "percdamp": 0.01,
                                                                               "sparsity_profile": "uniform"}
    owl = {**_resolved(), "prune": {**_resolved()["prune"], "sparsity_profile": "owl"}}
    assert stage_config(owl, "prune1", method="wanda")["prune"] == {"sparsity_profile": "owl", "owl_lambda": 0.08}
    assert stage_config(owl, "owl")["prune"] == {"owl_threshold": 5}
    assert sliced.resolved["prune"]["methods"] == ["sparsegpt"]  # the whole config, for the hash and MLflow only
