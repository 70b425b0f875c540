"""The README.md of every exported checkpoint folder (Hugging Face model card): YAML front matter a hub
reads (base_model, license carried from the source, tags, pattern and achieved sparsity), then what the
checkpoint is and how it is stored (dense with exact zeros: see docs/serving.md)."""
from __future__ import annotations

import re
from pathlib import Path

from .. import __version__
from ..core.architectures import looks_like_path
from ..core.config import config_hash
from ..core.stage_keys import resolved_config

STAGE_TITLES = {"prune1": "one-shot pruned (first prune only)",
                "prune1_adjust": "one-shot pruned, then weight-adjusted with the mask fixed (no dense phase)",
                "sds": "SDS (Sparse-Dense-Sparse) pruned"}
# the license files a source folder may hold; each is copied into the exported folder beside the card
LICENSE_GLOBS = ("LICENSE*", "LICENCE*", "NOTICE*")
# first-line titles of license texts, as the hub's license identifiers
_LICENSE_TITLES = ((re.compile(r"apache license", re.I), re.compile(r"version 2\.0", re.I), "apache-2.0"),
                   (re.compile(r"^\s*mit license", re.I | re.M), None, "mit"))
_HUB_CACHE = re.compile(r"^models--([^/]+?)--(.+)$")


def front_matter(readme: str) -> dict:
    """The YAML front matter of a model card ({} where it has none or it does not parse)."""
    import yaml

    if not readme.startswith("---"):
        return {}
    parts = re.split(r"^---[ \t]*$", readme, maxsplit=2, flags=re.M)
    if len(parts) < 3:
        return {}
    try:
        found = yaml.safe_load(parts[1])
    except yaml.YAMLError:
        return {}
    return found if isinstance(found, dict) else {}


def license_files(folder: str | Path | None) -> list[Path]:
    """The source folder's license files (LICENSE, LICENCE.txt, NOTICE, …), by name."""
    if folder is None:
        return []
    found = {f for pattern in LICENSE_GLOBS for f in Path(folder).glob(pattern) if f.is_file()}
    return sorted(found, key=lambda f: f.name)


def source_license(folder: str | Path | None) -> dict:
    """The license fields of the source: those of its README.md front matter (license, license_name,
    license_link); else, from a license file, its hub identifier where the file's title names Apache 2.0 or
    MIT, or `other` with a link to the file; {} where the source states none."""
    if folder is None:
        return {}
    readme = Path(folder) / "README.md"
    meta = front_matter(readme.read_text(errors="replace")) if readme.is_file() else {}
    if meta.get("license"):
        return {k: meta[k] for k in ("license", "license_name", "license_link") if meta.get(k)}
    for f in license_files(folder):
        head = "\n".join(f.read_text(errors="replace").splitlines()[:5])
        for title, version, name in _LICENSE_TITLES:
            if title.search(head) and (version is None or version.search(head)):
                return {"license": name}
        if f.name.upper().startswith(("LICENSE", "LICENCE")):
            return {"license": "other", "license_name": "source-license", "license_link": f.name}
    return {}


def base_model_id(source: str, folder: str | Path | None) -> str | None:
    """The source's hub id: `model.source` itself where it is one; a folder of the Hugging Face cache
    (…/models--org--name/snapshots/<revision>) gives org/name; the built-in model and other local folders
    have none."""
    if source == "builtin":
        return None
    if not looks_like_path(source):
        return source
    for part in Path(folder if folder is not None else source).resolve().parts:
        if m := _HUB_CACHE.match(part):
            return f"{m.group(1)}/{m.group(2)}"
    return None


def card_metadata(config: dict, pattern, sparsity: float, folder: str | Path | None,
                  profile: str = "uniform") -> dict:
    """The front matter's fields, in the order written."""
    meta = {}
    base = base_model_id(config["model"]["source"], folder)
    if base:
        meta["base_model"] = base
    meta.update(source_license(folder))
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation",
                 "tags": ["pruned", "sds", "sparse", str(pattern)], "sparsity_pattern": str(pattern),
                 "sparsity": round(float(sparsity), 6), "sparsity_profile": profile})
    return meta


def _profile_lines(summary: dict) -> str:
    """What the card says of the per-layer ratios: nothing for a uniform profile; for OWL, where they come
    from (M, λ) and that the table's `target` column holds them."""
    owl = summary.get("owl")
    if not summary.get("layer_sparsity") or not owl:
        return ""
    ratios = summary["layer_sparsity"]
    return (f"- Per-layer sparsity: OWL (outlier-weighted layerwise sparsity, Yin et al. 2024): each decoder "
            f"layer pruned to its own ratio, {min(ratios):.4f}-{max(ratios):.4f} (mean {sum(ratios) / len(ratios):.4f}), "
            f"from its share of outlier Wanda scores (M = {owl['threshold']}, λ = {owl['lambda']}); "
            "the table below gives each layer's ratio as `target`\n")


def _source_lines(config: dict, meta: dict) -> str:
    source = config["model"]["source"]
    if source == "builtin":
        base = "- Base model: the built-in demo model this pipeline trains itself (no hub id, no license)"
    elif "base_model" in meta:
        base = f"- Base model: `{meta['base_model']}`"
    else:
        base = f"- Base model: the local folder `{source}` (no hub id known, so no `base_model` field)"
    if "license" in meta:
        lic = f"- License: `{meta['license']}`, carried from the source" + (
            f" (its `{meta['license_link']}`, copied beside this card)" if "license_link" in meta else "")
    elif source == "builtin":
        lic = ""
    else:
        lic = ("- License: the source states none (no `license` in its README.md front matter, no LICENSE "
               "file): check its terms before sharing this checkpoint")
    return base + ("\n" + lic if lic else "")


def model_card(config: dict, stage: str, method: str, pattern, sparsity: dict, summary: dict,
               source_dir: str | Path | None = None) -> str:
    """`sparsity`: exact-zero fractions, overall and per decoder layer; `summary`: the checkpoint's layers.json;
    `source_dir`: the source model's folder (its README.md and license files)."""
    import yaml

    ratios = summary.get("layer_sparsity")
    meta = card_metadata(config, pattern, sparsity["overall"], None if config["model"]["source"] == "builtin"
                         else source_dir, summary.get("sparsity_profile", "uniform"))
    if ratios:
        header = "| decoder layer | target | sparsity |\n|---|---|---|"
        rows = "\n".join(f"| {i} | {ratios[int(i)]:.4f} | {s:.4f} |" for i, s in sparsity["per_layer"].items())
    else:
        header = "| decoder layer | sparsity |\n|---|---|"
        rows = "\n".join(f"| {i} | {s:.4f} |" for i, s in sparsity["per_layer"].items())
    errors = [v["rel_error"] for v in summary["linears"].values() if "rel_error" in v]
    mean_error = sum(errors) / max(len(errors), 1)
    early_exit = (f"- Linears that kept their first-prune weights (early exit): {summary.get('fallbacks', 0)}\n"
                  if stage == "sds" else "")
    return f"""---
{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip()}
---
# {STAGE_TITLES[stage][:1].upper() + STAGE_TITLES[stage][1:]} model

{_source_lines(config, meta)}
- Method: {STAGE_TITLES[stage]}, with `{method}` as the pruner, pattern `{pattern}`
- Achieved sparsity of decoder linear weights: {sparsity['overall']:.4f} (exact zeros; keep-masks in
  `../masks.safetensors`, 8 inputs per byte: `numpy.unpackbits(m, axis=1, bitorder="little")[:, :columns]`
  restores one, with `columns` from the file's metadata)
{_profile_lines(summary)}{early_exit}- Config hash: `{config_hash(resolved_config(config))}`; sds {__version__}
- Calibration metric: mean relative output error of the pruned linears vs the dense layers
  {mean_error:.5f} ({len(errors)} linears, {config['calibration']['nsamples']} × {config['calibration']['seqlen']} tokens)
- Evaluation metrics (perplexity, zero-shot) of dense, one-shot and SDS models:
  `results/{config['run']}/report/report.md` and `eval/` beside it

## Storage and serving: dense with zeros

The weights are ordinary dense safetensors in which the pruned weights are exact zeros: the folder is as
large as the source's, loads with `AutoModelForCausalLM.from_pretrained`, and runs no faster than the
dense model wherever it is served as is — a dense matmul multiplies the zeros too. A speed-up needs a
sparse kernel: for a 2:4 pattern, PyTorch's semi-structured sparsity
(`torch.sparse.to_sparse_semi_structured` on each linear's weight: CUDA GPUs of compute capability 8.0 or
newer, fp16/bf16 weights whose rows and columns are multiples of 32 and 64 with the CUTLASS backend, of 16
with cuSPARSELt), for which the SDS paper reports 1.46-2.12x on an A100 (not measured by this pipeline);
unstructured sparsity at these ratios has no fast kernel in PyTorch. No compressed
(sparse) storage format is written: compressed-tensors 0.20 and transformers 5.23 load none back.

{header}
{rows}
"""
