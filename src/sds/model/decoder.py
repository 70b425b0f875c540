"""A causal LM's decoder stack: its layers and their linears, capturing layer 0's inputs, running one layer
on its own."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..core.errors import ModelError


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


def final_modules(model: nn.Module) -> list[nn.Module]:
    """What the model applies between its last decoder layer and the output head, in order (OPT: the final
    LayerNorm where it has one, and project_out where hidden and embedding sizes differ; LLaMA family: the
    final RMSNorm)."""
    inner = getattr(model, "model", model)
    decoder = getattr(inner, "decoder", None)
    if decoder is not None:  # OPT
        return [m for m in (getattr(decoder, "final_layer_norm", None), getattr(decoder, "project_out", None))
                if m is not None]
    if getattr(inner, "norm", None) is None:
        raise ModelError(f"{type(model).__name__}: no final norm found after the decoder layers")
    return [inner.norm]


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
            model(input_ids=input_ids.to(model.get_input_embeddings().weight.device), use_cache=False)
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
