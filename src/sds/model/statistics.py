"""Layer-by-layer passes over a decoder stack: collect each linear's input statistics on calibration
data, let a caller-supplied function compute new weights, and propagate the hidden states.

This is the model plumbing shared by prune1, prune2 and the ablation (sequential protocol) and by
reconstruction (per-layer, from caches). The per-linear maths lives in `algorithms`.
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from ..algorithms.objective import LinearStats
from ..core.errors import HOW_TO_RECREATE, CorruptFileError, NumericalError
from .decoder import find_linears, run_layer

log = logging.getLogger(__name__)

# The saved statistics' form (metadata "stats_format"): "triu-1" stores each exactly symmetric H as its upper
# triangle, row by row (half the bytes, restored bit for bit), any other H whole; files without the field
# (the first form) hold every H whole.
STATS_FORMAT = "triu-1"


_TILE = 128  # the tiles the lower triangle is compared and copied in: transposing a whole 14336² H strides
#              through memory (seconds on a CPU); 128² tiles stay in cache (on a GPU: a few thousand copies)


def _tiles(n: int) -> list[tuple[int, int]]:
    return [(a, min(a + _TILE, n)) for a in range(0, n, _TILE)]


def pack_symmetric(H: torch.Tensor) -> torch.Tensor | None:
    """H's upper triangle (1-D, row by row: torch.triu_indices' order) if H equals its transpose bit for bit,
    else None. Copied row by row: no index tensor (triu_indices' int64 pairs, or the ones a boolean mask
    index builds, take 8 n(n+1) bytes: 1.6 GB at n = 14336)."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        return None
    n, tiles = H.shape[0], _tiles(H.shape[0])
    for k, (a, b) in enumerate(tiles):
        if not all(torch.equal(H[a:b, c:d], H[c:d, a:b].mT) for c, d in tiles[k:]):
            return None
    packed = torch.empty(n * (n + 1) // 2, dtype=H.dtype, device=H.device)
    start = 0
    for i in range(n):
        packed[start:start + n - i] = H[i, i:]
        start += n - i
    return packed


def unpack_symmetric(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n × n matrix whose upper triangle `pack_symmetric` gave: both halves copied, not computed."""
    H = torch.empty(n, n, dtype=packed.dtype, device=packed.device)
    start = 0
    for i in range(n):
        H[i, i:] = packed[start:start + n - i]
        start += n - i
    tiles = _tiles(n)
    for k, (a, b) in enumerate(tiles):  # the lower triangle: H[j, i] = H[i, j]
        diagonal = H[a:b, a:b]
        upper = torch.ones(b - a, b - a, dtype=torch.bool, device=packed.device).triu_()
        diagonal.copy_(torch.where(upper, diagonal, diagonal.mT))
        for c, d in tiles[:k]:
            H[a:b, c:d] = H[c:d, a:b].mT
    return H


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise NumericalError(f"non-finite values (NaN/Inf) in {what}")


class _InputRecorder:
    """Forward hooks that keep the latest input of each linear of a layer (flattened to tokens × in)."""

    def __init__(self, layer: nn.Module):
        self.inputs: dict[str, torch.Tensor] = {}
        self._handles = [
            mod.register_forward_hook(self._hook(name)) for name, mod in find_linears(layer).items()
        ]

    def _hook(self, name):
        def hook(_mod, args, _out):
            x = args[0]
            self.inputs[name] = x.reshape(-1, x.shape[-1])
        return hook

    def close(self):
        for h in self._handles:
            h.remove()


class StatsAccumulator:
    """Sums H = Σ x xᵀ (and with a separate target stream G = Σ x x′ᵀ, D = Σ x′ x′ᵀ) per linear.

    Linears fed the very same tensor (q/k/v) share one accumulator: the work is done once per input.
    """

    def __init__(self, cross: bool):
        self.cross = cross
        self.tokens = 0
        self._groups: dict[str, str] = {}  # linear name -> owner of its statistics
        self._sums: dict[str, list[torch.Tensor]] = {}

    def add(self, inputs: dict[str, torch.Tensor], target_inputs: dict[str, torch.Tensor] | None) -> None:
        seen: dict[int, str] = {}
        n = None
        for name, x in inputs.items():
            key = x.data_ptr()
            owner = self._groups.setdefault(name, seen.get(key, name))
            seen.setdefault(key, name)
            if owner != name:
                continue
            x = x.float()
            n = x.shape[0]
            sums = self._sums.setdefault(name, [])
            if self.cross:
                xt = target_inputs[name].float()
                terms = [x.T @ x, x.T @ xt, xt.T @ xt]
            else:
                terms = [x.T @ x]
            if not sums:
                sums.extend(terms)
            else:
                for acc, term in zip(sums, terms):
                    acc += term
        self.tokens += n or 0

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The normalised second moments (one tensor per distinct input, each symmetric one as its upper
        triangle: see STATS_FORMAT) and, as metadata, which linear reads which and each moment's width, so
        `from_tensors` restores an equivalent accumulator (e.g. in another stage) with the very same H."""
        if self.cross:
            raise ValueError("only plain (non-cross) statistics are saved")
        tensors, layout = {}, {}
        for owner, sums in self._sums.items():
            H = sums[0] / max(self.tokens, 1)
            packed = pack_symmetric(H)
            tensors[owner] = H if packed is None else packed
            layout[owner] = [H.shape[0], "full" if packed is None else "triu"]
        return tensors, {"groups": json.dumps(self._groups), "tokens": str(self.tokens), "stats_format": STATS_FORMAT,
                         "layout": json.dumps(layout, sort_keys=True)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str], source=None
                     ) -> "StatsAccumulator":
        """Statistics saved by `to_tensors` (already on the device they will be used on), of either form;
        `source` (the file) is named if they are of an unknown form or do not fit their metadata."""
        def refuse(why: str):
            return CorruptFileError(f"{source or 'statistics'}: {why}; re-run prune1 ({HOW_TO_RECREATE})", source)

        form = meta.get("stats_format")
        if form not in (None, STATS_FORMAT):
            raise refuse(f"statistics of an unknown form {form!r}")
        try:
            groups = json.loads(meta["groups"])
            layout = json.loads(meta["layout"]) if form else {o: [t.shape[0] if t.dim() else 0, "full"]
                                                              for o, t in tensors.items()}
        except (KeyError, ValueError) as exc:
            raise refuse(f"unreadable statistics metadata ({exc})") from None
        if sorted(layout) != sorted(tensors) or not set(groups.values()) <= set(tensors):
            raise refuse("the statistics' metadata does not match its tensors")
        acc = cls(cross=False)
        acc._groups = groups
        acc.tokens = 1  # the saved moments are already normalised
        for owner, t in tensors.items():
            n, kind = layout[owner]
            if kind == "triu" and tuple(t.shape) == (n * (n + 1) // 2,):
                acc._sums[owner] = [unpack_symmetric(t, n)]
            elif kind == "full" and tuple(t.shape) == (n, n):
                acc._sums[owner] = [t]
            else:
                raise refuse(f"statistics {owner!r} are {list(t.shape)}, not the {kind} form of {n} × {n}")
        return acc

    def stats(self, name: str) -> LinearStats:
        sums = [s / max(self.tokens, 1) for s in self._sums[self._groups[name]]]
        H = sums[0]
        return LinearStats(H, sums[1], sums[2]) if self.cross else LinearStats(H, H, H)

    def check_finite(self, layer_name: str) -> None:
        """Once per layer: any NaN/Inf in a linear's inputs makes its summed moments non-finite, so checking
        the sums catches it without a host synchronisation per batch."""
        for owner, sums in self._sums.items():
            for tensor in sums:
                check_finite(tensor, f"{layer_name} inputs of {owner}")


def _batched(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.unsqueeze(0) if hidden.dim() == 2 else hidden


def collect_stats(layer: nn.Module, stream: Iterable[torch.Tensor], kwargs: dict, *,
                  target_layer: nn.Module | None = None, target_stream: Iterable[torch.Tensor] | None = None,
                  layer_name: str = "layer") -> StatsAccumulator:
    """Runs `layer` over `stream` (batches of sequences, batch × seqlen × hidden, or single sequences) and
    accumulates its linears' input statistics.

    With `target_layer`/`target_stream`, also runs the target (the dense layer on the dense model's own
    hidden states) batch by batch and accumulates the cross moments.
    """
    cross = target_layer is not None
    acc = StatsAccumulator(cross)
    rec = _InputRecorder(layer)
    target_rec = _InputRecorder(target_layer) if cross else None
    targets = iter(target_stream) if cross else None
    try:
        for hidden in stream:
            run_layer(layer, _batched(hidden), kwargs)
            target_inputs = None
            if cross:
                run_layer(target_layer, _batched(next(targets)), kwargs)
                target_inputs = target_rec.inputs
            acc.add(rec.inputs, target_inputs)
    finally:
        rec.close()
        if target_rec:
            target_rec.close()
    acc.check_finite(layer_name)
    return acc


def propagate(layer: nn.Module, stream: Iterable[torch.Tensor], kwargs: dict, layer_name: str = "layer"
              ) -> Iterator[torch.Tensor]:
    """Yields the layer's output for each batch of `stream` (batch × seqlen × hidden). Non-finite outputs
    are detected on the device and reported once, after the last batch (before the caller's output file
    is complete, so it is discarded)."""
    finite = None
    for hidden in stream:
        out = run_layer(layer, _batched(hidden), kwargs)
        ok = torch.isfinite(out).all()
        finite = ok if finite is None else finite & ok
        yield out
    if finite is not None and not bool(finite):
        raise NumericalError(f"non-finite values (NaN/Inf) in {layer_name} output")


LinearUpdate = Callable[[str, torch.Tensor, LinearStats], tuple[torch.Tensor, torch.Tensor | None, dict]]


def update_layer(layer: nn.Module, acc: StatsAccumulator, update: LinearUpdate) -> dict[str, dict]:
    """Applies `update(name, current_weight, stats) -> (new_weight, mask_or_None, info)` to each linear."""
    infos = {}
    for name, mod in find_linears(layer).items():
        stats = acc.stats(name)
        new_weight, mask, info = update(name, mod.weight.detach(), stats)
        check_finite(new_weight, f"new weights of {name}")
        with torch.no_grad():
            mod.weight.copy_(new_weight.to(mod.weight.dtype))
        info = dict(info)
        if mask is not None:
            info["mask"] = mask
        infos[name] = info
    return infos
