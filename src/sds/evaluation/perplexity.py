"""Evaluation of one checkpoint: perplexity (the SparseGPT/Wanda protocol) on every configured text, one
decoder layer in memory at a time, with the head's logits in chunks; zero-shot accuracy of the whole model;
achieved-sparsity checks."""
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
    return sum(_layer_violations(find_linears(layer).values(), pattern) for layer in decoder_layers(model))


# Bytes of float32 logits the head computes at once: 128 k vocabulary x 512 tokens, so a 128 k-token
# vocabulary never makes a batch's logits (8 x 2048 tokens: 8.4 GB) at once.
LOGIT_CHUNK_BYTES = 256 << 20


def chunked_nll(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Summed next-token NLL of each sequence: `hidden` (b x s x d, after the final norm), `targets` (b x s
    token ids); the head runs on a chunk of positions at a time (LOGIT_CHUNK_BYTES of logits)."""
    b, s, d = hidden.shape
    flat, labels = hidden[:, :-1].reshape(-1, d), targets[:, 1:].reshape(-1).to(hidden.device)
    rows = max(1, LOGIT_CHUNK_BYTES // (4 * head.weight.shape[0]))
    nll = torch.empty(flat.shape[0], dtype=torch.float64, device=hidden.device)
    for start in range(0, flat.shape[0], rows):
        logits = head(flat[start:start + rows]).float()
        nll[start:start + rows] = nn.functional.cross_entropy(logits, labels[start:start + rows], reduction="none")
    return nll.reshape(b, s - 1).sum(1)


def layerwise_scores(lm, windows: torch.Tensor, *, weights=None, pattern: Pattern | None = None, batch: int,
                     work_dir: Path, progress=None) -> dict:
    """Perplexity's summed NLL per window, the exact-zero sparsity of every decoder linear and the N:M
    violations, with one decoder layer of `lm` (a model.loading.LayerwiseModel) in memory at a time: the
    windows' hidden states go through layer i (its linears taken from `weights` where given: a first-prune
    checkpoint) before layer i+1 is read; they stay in memory up to streams.held_stream_bytes and go to
    `work_dir` beyond, so memory does not grow with depth or with the number of windows."""
    from ..core.runtime import release_memory
    from ..model.decoder import capture_layer_inputs, final_modules
    from ..model.statistics import propagate
    from ..model.streams import WorkStream

    seqlen = windows.shape[1]
    kwargs = lm.kwargs(seqlen)
    stream = WorkStream(work_dir, work_dir / "none", dtype=lm.dtype, device=lm.device, batch_size=batch,
                        row_group_size=batch)
    stream.advance((capture_layer_inputs(lm.model, windows[i:i + batch])[0]
                    for i in range(0, windows.shape[0], batch)), 0)
    zeros = total = violations = 0
    per_layer = {}
    for i in range(len(lm)):
        layer = lm.layer(i)
        linears = find_linears(layer)
        with torch.no_grad():
            for name, full in lm.linear_names(i).items():
                if weights is not None:
                    linears[name].weight.copy_(weights[full].to(lm.device, linears[name].weight.dtype))
        layer_zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
        layer_total = sum(m.weight.numel() for m in linears.values())
        per_layer[i] = layer_zeros / max(layer_total, 1)
        zeros, total = zeros + layer_zeros, total + layer_total
        violations += _layer_violations(linears.values(), pattern)
        stream.advance(propagate(layer, stream, kwargs, layer_name=f"layer {i}"), i + 1)
        lm.release(i)
        release_memory(lm.device)
        if progress is not None:
            progress(i + 1)
    head, finals = lm.head(), final_modules(lm.model)
    nll, done = torch.empty(windows.shape[0], dtype=torch.float64), 0
    with torch.no_grad():
        for hidden in stream:
            for module in finals:
                hidden = module(hidden)
            nll[done:done + hidden.shape[0]] = chunked_nll(hidden, windows[done:done + hidden.shape[0]], head).cpu()
            done += hidden.shape[0]
    stream.close()
    return {"nll": nll, "sparsity": zeros / max(total, 1), "sparsity_per_layer": per_layer,
            "pattern_violations": violations}


def _layer_violations(linears, pattern: Pattern | None) -> int:
    if pattern is None or pattern.kind != "nm":
        return 0
    return sum(int(((m.weight != 0).reshape(m.weight.shape[0], -1, pattern.m).sum(-1) > pattern.n).sum())
               for m in linears)


def evaluation_texts(tokenizer, config: dict, corpus_dir=None) -> list[dict]:
    """Every `evaluate.datasets` text as perplexity windows, with what tracking records of it (`args` for
    tracking.text_input, and keywords)."""
    from ..data.texts import read_text_source, tokenize
    from ..data.windows import perplexity_windows

    ev = config["evaluate"]
    texts = []
    for name, source in ev["datasets"].items():
        builtin = Path(corpus_dir) / "test.txt" if corpus_dir else None
        text = read_text_source(source, builtin_text=builtin, split="test")
        ids = tokenize(tokenizer, text)
        texts.append({"name": name, "windows": perplexity_windows(ids, ev["seqlen"], ev["max_windows"]),
                      "args": (name, source, text, ids.numel(), "evaluation"),
                      "path": builtin if source == "builtin" else None})
    return texts


def evaluate_layerwise(lm, tokenizer, config: dict, *, label: str, weights=None, pattern: Pattern | None = None,
                       corpus_dir=None, work_dir: Path) -> tuple[dict, list[dict]]:
    """Perplexity on every `evaluate.datasets` text (all windows in one layer-by-layer pass), the
    exact-zero sparsity and N:M violations of the checkpoint. Returns the scores and, per text, what
    tracking records of it."""
    from ..core.runtime import Progress
    from ..model.passes import batch_size

    log = logging.getLogger("sds")
    texts = evaluation_texts(tokenizer, config, corpus_dir)
    windows = torch.cat([t["windows"] for t in texts])
    batch = batch_size(config, lm, *windows.shape)  # config `forward_batch`, as the compression passes
    layerwise = layerwise_scores(lm, windows, weights=weights, pattern=pattern, batch=batch, work_dir=work_dir,
                                 progress=Progress(f"evaluate {label} layer", len(lm), lm.device))
    scores = {"ppl": {}, "windows": {}, "sparsity": layerwise["sparsity"],
              "sparsity_per_layer": layerwise["sparsity_per_layer"]}
    if pattern is not None:
        scores["pattern_violations"] = layerwise["pattern_violations"]
    done = 0
    for t in texts:
        n = t["windows"].shape[0]
        nll = float(layerwise["nll"][done:done + n].sum())
        scores["ppl"][t["name"]] = math.exp(nll / (n * (windows.shape[1] - 1)))
        scores["windows"][t["name"]] = n
        done += n
        log.info("%s: perplexity on %s = %.4f (%d windows of %d)", label, t["name"], scores["ppl"][t["name"]], n,
                 windows.shape[1])
    return scores, [{"args": t["args"], "windows": t["windows"].shape[0], "path": t["path"]} for t in texts]


def zeroshot_scores(model: nn.Module, tokenizer, config: dict, tasks: dict, *, label: str) -> dict:
    """Zero-shot accuracy of a whole (possibly offloaded) model on `tasks` (evaluation.zeroshot.load_tasks),
    with a result line per task."""
    from .zeroshot import evaluate_zeroshot

    zs = config["evaluate"]["zeroshot"]
    start = time.monotonic()
    scores = evaluate_zeroshot(model, tokenizer, tasks, batch_size=zs["batch_size"], limit=zs["limit"],
                               bootstrap_iters=zs["bootstrap_iters"], seed=config["seed"], label=label)
    scores["seconds"] = time.monotonic() - start
    log = logging.getLogger("sds")
    for name, row in scores["tasks"].items():
        log.info("%s: zero-shot %s acc = %.4f%s (n = %d)", label, name,
                 row["acc"] if row.get("acc") is not None else float("nan"),
                 f", acc_norm = {row['acc_norm']:.4f}" if row.get("acc_norm") is not None else "", row["n"])
    log.info("%s: zero-shot mean acc = %.4f over %s (%.1fs)", label, scores["mean"].get("acc", float("nan")),
             ", ".join(tasks), scores["seconds"])
    return scores
