"""Token windows: seeded calibration samples (stored as Parquet) and the perplexity protocol's windows."""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import HOW_TO_RECREATE, CorruptFileError, DataError
from ..storage.atomic import atomic_path
from ..storage.checksums import verify_checksum


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens (seeded), shape (nsamples, seqlen)."""
    if ids.numel() < seqlen + 1:
        raise DataError(f"calibration text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def perplexity_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ⌊T/seqlen⌋ × seqlen, the SparseGPT/Wanda perplexity protocol."""
    n = ids.numel() // seqlen
    if n == 0:
        raise DataError(f"evaluation text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


def write_calibration(path: str | Path, windows: torch.Tensor) -> None:
    """The calibration windows (nsamples × seqlen token ids) as Parquet, atomically, with its checksum and
    ownership record (it is a stage output the CLI may remove when it is found corrupt)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"input_ids": pa.array(windows.to(torch.int32).tolist(), type=pa.list_(pa.int32()))})
    with atomic_path(path, checksum=True, record=True) as tmp:
        pq.write_table(table, str(tmp))


def read_calibration(path: str | Path) -> torch.Tensor:
    """The windows `write_calibration` wrote, checksum verified (long, nsamples × seqlen)."""
    import pyarrow.parquet as pq

    verify_checksum(path)
    try:
        column = pq.read_table(str(path), columns=["input_ids"]).column("input_ids").to_pylist()
    except Exception as exc:
        raise CorruptFileError(f"{path}: not a readable calibration file ({exc}); {HOW_TO_RECREATE}") from None
    return torch.tensor(column, dtype=torch.long)
