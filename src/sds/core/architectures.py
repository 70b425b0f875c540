"""Which checkpoints the layer walker supports, decided from a model folder's config.json alone (no torch,
no weights), so an unsupported model is refused before any work, in one line naming it.

Also resolves `model.source` to a folder: a local save_pretrained folder, or a Hugging Face id found in
the local cache (nothing is ever downloaded at run time).
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ArchitectureError
from .sources import HF_PREFIX

# model_type -> family. Every supported family has a ModuleList of decoder layers whose linears are plain
# nn.Linear (OPT: q/k/v/out_proj, fc1/fc2; LLaMA family: q/k/v/o_proj, gate/up/down_proj with RMSNorm,
# rotary embeddings and grouped-query attention). GPT-2, Falcon and BLOOM are refused: GPT-2's linears
# are Conv1D (transposed weights) and the others fuse q/k/v into one matrix with their own layouts.
SUPPORTED = {"opt": "OPT", "llama": "LLaMA", "mistral": "LLaMA family (Mistral)", "qwen2": "LLaMA family (Qwen2)"}
SUPPORTED_TEXT = "OPT (opt) and the LLaMA family (llama incl. SmolLM2, mistral, qwen2)"

# Files of a save_pretrained folder that a stage reads: they are the rules' inputs, so replacing one
# re-runs what depends on it.
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                       "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                       "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def looks_like_path(source: str) -> bool:
    path = Path(source)
    return path.is_absolute() or source.startswith(".") or path.exists() or len(path.parts) > 2


def resolve_model_dir(source: str) -> Path:
    """The folder holding the model `source` names: itself if it is a path, else the snapshot of a Hugging
    Face id (`org/name` or `hf:org/name`) in the local cache (HF_HOME / HF_HUB_CACHE honoured). Raises
    ArchitectureError in one line."""
    hub_id = source.removeprefix(HF_PREFIX)
    if hub_id == source and looks_like_path(source):
        path = Path(source)
        if not path.is_dir():
            raise ArchitectureError(f"model path {source!r} does not exist or is not a directory")
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        return Path(snapshot_download(hub_id, local_files_only=True))
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        raise ArchitectureError(
            f"model {source!r} is neither a local folder nor in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); nothing is downloaded at run time: give a save_pretrained folder "
            "or download it once beforehand") from None
    except Exception as exc:  # e.g. an invalid repo id
        raise ArchitectureError(f"model {source!r}: not a local folder, and not a valid Hugging Face id ({exc})"
                                ) from None


def model_files(folder: str | Path) -> list[str]:
    """The files of a model folder that the stages read (weights, config, tokenizer), sorted."""
    folder = Path(folder)
    found = {str(p) for pattern in MODEL_FILE_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


def read_model_config(folder: str | Path) -> dict:
    """The folder's config.json, after checking the folder holds safetensors weights."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ArchitectureError(f"model path {str(folder)!r} has no config.json (expected a save_pretrained folder)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.index.json")):
        raise ArchitectureError(f"model path {str(folder)!r} has no *.safetensors weights "
                                "(only safetensors checkpoints are loaded; a pytorch_model.bin is never unpickled)")
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArchitectureError(f"{cfg_file}: not a readable config.json ({exc})") from None


# A tokenizer's vocabulary: one of these files (tokenizer_config.json alone names a class, not a vocabulary;
# transformers then builds an empty tokenizer, and every text would tokenize to nothing).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def check_tokenizer(folder: str | Path) -> None:
    """Refuses a model folder that holds no tokenizer vocabulary, naming the folder and the files looked for."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ArchitectureError(f"model path {str(folder)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                                "save the tokenizer beside the weights (tokenizer.save_pretrained(folder))")


# Dtypes a checkpoint may declare (config.json's `dtype`, or `torch_dtype` before transformers 5) that a
# stage runs in with `model.dtype: auto`.
SOURCE_DTYPES = ("float32", "float16", "bfloat16")


def source_dtype(model_config: dict) -> str:
    """The dtype a checkpoint's config.json declares its weights in; float32 where it names none (as
    transformers' own default). A dtype this pipeline does not run in is refused in one line."""
    declared = model_config.get("dtype") or model_config.get("torch_dtype") or "float32"
    if declared not in SOURCE_DTYPES:
        raise ArchitectureError(f"config.json declares dtype {declared!r}; model.dtype 'auto' runs in "
                                f"{', '.join(SOURCE_DTYPES)}: set model.dtype to one of them")
    return declared


def attention_window(model_config: dict) -> int | None:
    """The sliding-window size some layers use, or None when every layer attends to the whole context."""
    window = model_config.get("sliding_window")
    layer_types = model_config.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        return window or 0
    if model_config.get("model_type") == "qwen2" and not model_config.get("use_sliding_window", False):
        return None
    return window if window else None


def check_supported(model_config: dict, seqlen: int, source: str) -> None:
    """Refuses, in one line, a model whose layers the walker would get silently wrong at `seqlen` tokens."""
    model_type = model_config.get("model_type")
    if not model_type:
        raise ArchitectureError(f"model {source!r}: its config.json names no model_type, so the architecture is "
                                f"unknown; supported: {SUPPORTED_TEXT}")
    arch = ",".join(model_config.get("architectures") or []) or model_type
    if model_type not in SUPPORTED:
        raise ArchitectureError(f"model {source!r}: unsupported architecture {arch} (model_type {model_type!r}); "
                                f"supported: {SUPPORTED_TEXT}")
    window = attention_window(model_config)
    if window is not None and seqlen > window:
        raise ArchitectureError(
            f"model {source!r}: {arch} uses sliding-window or per-layer attention types (window {window}) and the "
            f"configured sequence length {seqlen} exceeds it; the layer walker passes every layer the same "
            f"full causal mask, so this would be silently wrong. Use seqlen ≤ {window} or another model "
            f"(supported: {SUPPORTED_TEXT})")
