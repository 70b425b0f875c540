"""The README.md of every exported checkpoint folder (Hugging Face model card)."""
from __future__ import annotations

from .. import __version__
from ..core.config import config_hash
from ..core.stage_keys import resolved_config

STAGE_TITLES = {"prune1": "one-shot pruned (first prune only)",
                "prune1_adjust": "one-shot pruned, then weight-adjusted with the mask fixed (no dense phase)",
                "sds": "SDS (Sparse-Dense-Sparse) pruned"}


def model_card(config: dict, stage: str, method: str, pattern, sparsity: dict, summary: dict) -> str:
    """`sparsity`: exact-zero fractions, overall and per decoder layer; `summary`: the checkpoint's layers.json."""
    rows = "\n".join(f"| {i} | {s:.4f} |" for i, s in sparsity["per_layer"].items())
    errors = [v["rel_error"] for v in summary["linears"].values() if "rel_error" in v]
    mean_error = sum(errors) / max(len(errors), 1)
    early_exit = (f"- Linears that kept their first-prune weights (early exit): {summary.get('fallbacks', 0)}\n"
                  if stage == "sds" else "")
    return f"""---
library_name: transformers
tags: [sparse, pruning, sds]
---
# {STAGE_TITLES[stage].capitalize()} model

- Base model: `{config['model']['source']}`
- Method: {STAGE_TITLES[stage]}, with `{method}` as the pruner, pattern `{pattern}`
- Achieved sparsity of decoder linear weights: {sparsity['overall']:.4f} (exact zeros; keep-masks in
  `../masks.safetensors`, 8 inputs per byte: `numpy.unpackbits(m, axis=1, bitorder="little")[:, :columns]`
  restores one, with `columns` from the file's metadata)
{early_exit}- Config hash: `{config_hash(resolved_config(config))}`; sds {__version__}
- Calibration metric: mean relative output error of the pruned linears vs the dense layers
  {mean_error:.5f} ({len(errors)} linears, {config['calibration']['nsamples']} × {config['calibration']['seqlen']} tokens)
- Evaluation metrics (perplexity, zero-shot) of dense, one-shot and SDS models:
  `results/{config['run']}/report/report.md` and `eval/` beside it

Weights are dense safetensors with exact zeros; load with `AutoModelForCausalLM.from_pretrained`.

| decoder layer | sparsity |
|---|---|
{rows}
"""
