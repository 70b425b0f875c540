"""Evaluation of one checkpoint: perplexity (the SparseGPT/Wanda protocol) on every configured text,
zero-shot accuracy, and achieved-sparsity checks."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..core.patterns import Pattern
from ..model.decoder import decoder_layers, find_linears


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


def evaluate_checkpoint(model: nn.Module, tokenizer, config: dict, *, label: str, corpus_dir=None,
                        zeroshot_files: dict | None = None) -> tuple[dict, list[dict]]:
    """Perplexity on every `evaluate.datasets` text, zero-shot accuracy on `zeroshot_files` (from
    core.tasksets.task_files; None: none) and the exact-zero sparsity of `model`. Returns the scores and, per
    text, what tracking records of it (`args` for tracking.text_input, and keywords)."""
    from ..core.runtime import Progress
    from ..data.texts import read_text_source, tokenize
    from ..data.windows import perplexity_windows

    log = logging.getLogger("sds")
    ev = config["evaluate"]
    scores = {"ppl": {}, "windows": {}}
    texts = []
    for name, source in ev["datasets"].items():
        builtin = Path(corpus_dir) / "test.txt" if corpus_dir else None
        text = read_text_source(source, builtin_text=builtin, split="test")
        ids = tokenize(tokenizer, text)
        windows = perplexity_windows(ids, ev["seqlen"], ev["max_windows"])
        texts.append({"args": (name, source, text, ids.numel(), "evaluation"), "windows": windows.shape[0],
                      "path": builtin if source == "builtin" else None})
        progress = Progress(f"evaluate {label} on {name}: window", windows.shape[0])
        scores["ppl"][name] = perplexity(model, windows, progress=lambda d, n: progress(d, n) if d == n else None)
        scores["windows"][name] = windows.shape[0]
        log.info("%s: perplexity on %s = %.4f (%d windows of %d)", label, name, scores["ppl"][name],
                 windows.shape[0], ev["seqlen"])
    if zeroshot_files:
        from .zeroshot import evaluate_zeroshot

        zs = ev["zeroshot"]
        start = time.monotonic()
        scores["zeroshot"] = evaluate_zeroshot(model, tokenizer, zeroshot_files, batch_size=zs["batch_size"],
                                               limit=zs["limit"], bootstrap_iters=zs["bootstrap_iters"],
                                               seed=config["seed"])
        scores["zeroshot"]["seconds"] = time.monotonic() - start
        log.info("%s: zero-shot mean acc = %.4f over %s (%.1fs)", label,
                 scores["zeroshot"]["mean"].get("acc", float("nan")), ", ".join(zeroshot_files),
                 scores["zeroshot"]["seconds"])
    sparsity = measured_sparsity(model)
    scores["sparsity"], scores["sparsity_per_layer"] = sparsity["overall"], sparsity["per_layer"]
    return scores, texts
