"""The config keys each stage reads: one table, used by the rules' `params` (Snakemake re-runs a rule when
the values of its keys change) and by the CLI, which hands a stage only its slice of the resolved config
(`stage_config`), so a stage that reads a key the table does not list fails instead of going stale.

A key is a dotted path into the resolved config; `{recon}` stands for the SDS setting a job runs. A stage
also sees CONTEXT_KEYS, which change no number a stage writes (where results go and where they are
tracked), and the whole resolved config for bookkeeping only (its hash and MLflow record; `resolved`).
Torch is seeded from `seed` where a stage lists it and with 0 elsewhere (those stages draw no random
numbers; a fixed seed keeps any that slip in reproducible).
"""
from __future__ import annotations

import json
from typing import Mapping

# The `prune` keys each one-shot pruner reads (algorithms.dispatch reads exactly these).
PRUNER_KEYS = {
    "magnitude": (),
    "wanda": (),
    "sparsegpt": ("prune.blocksize", "prune.percdamp"),
    "admm": ("prune.admm_iters", "prune.admm_gradual_iters", "prune.admm_percdamp", "prune.admm_norm_floor"),
    "alps": ("prune.alps_iters", "prune.alps_rho", "prune.alps_rho_growth", "prune.alps_pcg_iters",
             "prune.alps_percdamp", "prune.alps_damping", "prune.alps_norm_floor"),
}

# The `prune` keys prune1 reads to turn OWL's outlier fractions into per-layer ratios (with sparsity_profile
# 'owl' only; the fractions themselves are the `owl` stage's, its threshold a key of that stage). The later
# stages take prune1's ratios from its layers.json, so they read neither.
OWL_KEYS = ("prune.owl_lambda",)

# Keys of a `reconstruct` setting that the dense phase reads (its `prune2` overrides are the second prune's).
DENSE_PHASE_KEYS = ("granularity", "inputs", "target", "l1", "l2", "l1_pruned_weight", "solver", "iters", "rho",
                    "norm_floor", "steps")

# Keys of the `prune2` section (and of a setting's `prune2` overrides) that the post-prune adjustment reads.
ADJUST_KEYS = ("prune2.adjust", "prune2.adjust_steps", "prune2.adjust_iters", "prune2.admm_percdamp",
               "prune2.admm_norm_floor", "prune2.adjust_target", "prune2.percdamp")

# Read by every stage, never a reason to re-run: the run's name and the results root (where its outputs go),
# MLflow's settings, and trust_remote_code (the allow-listed architectures load with transformers' own
# classes either way).
CONTEXT_KEYS = ("run", "results_dir", "mlflow", "model.trust_remote_code")

_LAYER_PASS = ("threads", "device", "model.dtype", "forward_batch")
_CARD = ("model.source", "calibration.nsamples", "calibration.seqlen")  # what a model card states

STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "corpus": ("seed", "model.builtin.corpus"),
    "build_model": ("seed", "model.builtin"),
    "calibration": ("seed", "calibration", "model.source"),
    "layer_inputs": _LAYER_PASS + ("activations.row_group_size",),
    "activations": _LAYER_PASS + ("activations",),
    "owl": _LAYER_PASS + ("activations.row_group_size", "prune.owl_threshold"),  # OWL's dense pass
    "prune1": _LAYER_PASS + ("activations", "prune.sparsity_profile"),  # + PRUNER_KEYS, OWL_KEYS with owl
    "prune1_adjust": _LAYER_PASS + ("activations.row_group_size",) + ADJUST_KEYS,
    "reconstruct": _LAYER_PASS,  # + the setting's DENSE_PHASE_KEYS
    "reconstruct_one_layer": _LAYER_PASS,  # the same, one decoder layer per job
    "reconstruct_gather": (),  # + the setting's DENSE_PHASE_KEYS (recorded in layers.json)
    "prune2": _LAYER_PASS + ("activations.row_group_size", "prune2") + _CARD,  # + pruner keys + `prune2` overrides
    "export": ("model.dtype",) + _CARD,
    "zeroshot_tasks": ("seed", "evaluate.zeroshot.builtin_items"),
    "evaluate": ("seed", "threads", "device", "model.dtype", "forward_batch", "evaluate"),
    "report": ("report", "evaluate.datasets", "evaluate.seqlen", "evaluate.zeroshot.enabled",
               "evaluate.zeroshot.tasks", "calibration.source", "calibration.nsamples", "calibration.seqlen",
               "model.source"),
}


def _gradual(config: Mapping, recon: str) -> bool:
    overrides = config["reconstruct"][recon].get("prune2", {})
    return overrides.get("selection", config["prune2"]["selection"]) == "gradual"


def stage_keys(config: Mapping, stage: str, *, method: str | None = None, recon: str | None = None) -> tuple[str, ...]:
    """The keys `stage` reads for one job (`method`, `recon`: the job's wildcards), in table order."""
    if stage not in STAGE_KEYS:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGE_KEYS)}")
    keys = list(STAGE_KEYS[stage])
    if stage in ("prune1", "prune2") and method is not None:
        keys += PRUNER_KEYS[method]
    if stage == "prune1" and config["prune"]["sparsity_profile"] == "owl":
        keys += OWL_KEYS
    if stage.startswith("reconstruct") and recon is not None:
        keys += [f"reconstruct.{recon}.{k}" for k in DENSE_PHASE_KEYS]
    if stage == "prune2" and recon is not None:
        keys.append(f"reconstruct.{recon}.prune2")
        if _gradual(config, recon):  # the gradual second prune is ADMM's mask selection
            keys += PRUNER_KEYS["admm"]
    return tuple(dict.fromkeys(keys))


def _lookup(config: Mapping, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def stage_params(config: Mapping, stage: str, **wildcards) -> str:
    """A rule's `params`: the values of the keys its stage reads, as one JSON string."""
    return json.dumps({key: _lookup(config, key) for key in stage_keys(config, stage, **wildcards)}, sort_keys=True)


class StageConfig(dict):
    """The slice of the resolved config one stage may read (its keys and CONTEXT_KEYS, nested as in the
    config); `resolved` is the whole config, for its hash and the MLflow record only."""

    def __init__(self, values: dict, resolved: Mapping, stage: str):
        super().__init__(values)
        self.resolved = resolved
        self.stage = stage

    def __missing__(self, key):
        raise KeyError(f"stage {self.stage!r} read config key {key!r}, which core/stage_keys.py does not list "
                       "for it (add it there, so that changing it re-runs the stage)")


def _place(out: dict, key: str, value) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        out = out.setdefault(part, {})
    out[parts[-1]] = value


def stage_config(config: Mapping, stage: str, **wildcards) -> StageConfig:
    """`config` cut down to what `stage` reads (see stage_keys), plus the context keys."""
    import copy

    values: dict = {}
    for key in CONTEXT_KEYS + stage_keys(config, stage, **wildcards):
        _place(values, key, copy.deepcopy(_lookup(config, key)))
    return StageConfig(values, config, stage)


def resolved_config(config: Mapping) -> Mapping:
    """The whole resolved config behind a stage's slice (a plain config is its own)."""
    return getattr(config, "resolved", config)
