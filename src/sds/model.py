"""Model plumbing: loading, finding decoder layers and their linears, running one layer on its own.

Nothing here prunes or fits anything; the algorithms (pruners, reconstruct) get plain tensors.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn


class ModelError(ValueError):
    """A model that cannot be used, with a message naming the path or architecture."""


def load_model(source: str | Path, *, dtype: str = "float32", trust_remote_code: bool = False,
               device: str = "cpu"):
    """Loads a causal LM and its tokenizer from a local directory or hub id (offline caches honoured)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source)
    looks_local = path.is_absolute() or str(source).startswith(".") or path.exists() or len(path.parts) > 2
    if looks_local:
        if not path.is_dir():
            raise ModelError(f"model path {str(source)!r} does not exist or is not a directory")
        if not (path / "config.json").is_file():
            raise ModelError(f"model path {str(source)!r} has no config.json (expected a save_pretrained folder)")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.safetensors.index.json")):
            raise ModelError(f"model path {str(source)!r} has no *.safetensors weights "
                             "(only safetensors checkpoints are loaded)")
        from .io import verify_folder

        verify_folder(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(source), dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelError(f"cannot load model {str(source)!r}: {exc}") from exc
    model.config.use_cache = False
    model.eval()
    decoder_layers(model)  # fail early on an unsupported architecture
    return model.to(device), tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (OPT: model.decoder.layers; LLaMA family: model.layers)."""
    inner = getattr(model, "model", model)
    for candidate in (getattr(getattr(inner, "decoder", None), "layers", None), getattr(inner, "layers", None)):
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
            return candidate
    raise ModelError(f"unsupported architecture {type(model).__name__}: no decoder layer stack found "
                     "(supported: OPT and LLaMA-family decoders)")


def decoder_layers_prefix(model: nn.Module) -> str:
    """State-dict prefix of the decoder layers, e.g. 'model.decoder.layers'."""
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ModelError("decoder layers are not registered as a submodule")


def find_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The layer's nn.Linear modules by qualified name, in forward order."""
    return {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


class _Captured(Exception):
    def __init__(self, hidden: torch.Tensor, kwargs: dict):
        self.hidden, self.kwargs = hidden, kwargs


_DROP_KWARGS = {"past_key_values", "past_key_value", "use_cache", "output_attentions"}


def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Runs the model only up to decoder layer 0; returns that layer's hidden-state input and the
    keyword arguments the model passes to every layer (attention mask, positions, rotary tables)."""
    layer0 = decoder_layers(model)[0]

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        extra = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS and k != "hidden_states"}
        raise _Captured(hidden, extra)

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    except _Captured as captured:
        return captured.hidden.detach(), captured.kwargs
    finally:
        handle.remove()
    raise ModelError("decoder layer 0 was never called")


def layer_kwargs(model: nn.Module, seqlen: int) -> dict:
    """Per-layer keyword arguments for a batch of one sequence of `seqlen` tokens."""
    dummy = torch.zeros(1, seqlen, dtype=torch.long)
    return capture_layer_inputs(model, dummy)[1]


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def clone_layer(layer: nn.Module) -> nn.Module:
    return copy.deepcopy(layer)


def layer_linear_weights(model: nn.Module, layer_index: int) -> dict[str, torch.Tensor]:
    """Full state-dict names → weight tensors of every linear in one decoder layer."""
    prefix = f"{decoder_layers_prefix(model)}.{layer_index}"
    layer = decoder_layers(model)[layer_index]
    return {f"{prefix}.{name}.weight": mod.weight.detach() for name, mod in find_linears(layer).items()}


def set_layer_linear_weights(model: nn.Module, layer_index: int, weights: dict[str, torch.Tensor]) -> None:
    prefix = f"{decoder_layers_prefix(model)}.{layer_index}"
    layer = decoder_layers(model)[layer_index]
    for name, mod in find_linears(layer).items():
        key = f"{prefix}.{name}.weight"
        if key in weights:
            with torch.no_grad():
                mod.weight.copy_(weights[key].to(mod.weight.dtype))


def apply_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Overwrites parameters named in `weights` (full state-dict names); unknown names are an error."""
    params = dict(model.named_parameters())
    missing = [k for k in weights if k not in params]
    if missing:
        raise ModelError(f"checkpoint names {len(missing)} tensors the model lacks, e.g. {missing[0]!r}")
    with torch.no_grad():
        for key, value in weights.items():
            params[key].copy_(value.to(params[key].dtype))
