"""Perplexity (the SparseGPT/Wanda protocol) and achieved-sparsity checks."""
from __future__ import annotations

import math

import torch
from torch import nn

from .model import decoder_layers, find_linears
from .patterns import Pattern


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, progress=None) -> float:
    """exp(mean token NLL) over non-overlapping windows (n × seqlen), each scored independently."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                          reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
        if progress is not None:
            progress(min(start + batch_size, windows.shape[0]), windows.shape[0])
    return math.exp(total_nll / total_tokens)


def measured_sparsity(model: nn.Module) -> dict:
    """Exact-zero fraction of every decoder linear weight, per layer and overall."""
    per_layer, zeros, total = {}, 0, 0
    for i, layer in enumerate(decoder_layers(model)):
        lz, lt = 0, 0
        for mod in find_linears(layer).values():
            lz += int((mod.weight == 0).sum())
            lt += mod.weight.numel()
        per_layer[i] = lz / lt
        zeros, total = zeros + lz, total + lt
    return {"overall": zeros / total, "per_layer": per_layer}


def pattern_violations(model: nn.Module, pattern: Pattern) -> int:
    """Number of groups breaking an N:M pattern (more than N non-zeros in M consecutive inputs)."""
    if pattern.kind != "nm":
        return 0
    bad = 0
    for layer in decoder_layers(model):
        for mod in find_linears(layer).values():
            W = mod.weight
            groups = (W != 0).reshape(W.shape[0], -1, pattern.m).sum(-1)
            bad += int((groups > pattern.n).sum())
    return bad
