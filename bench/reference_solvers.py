"""The reference implementations bench/solver_bench.py compares our pruners with, each imported from a local
checkout and wrapped as `run(W, H, pattern) -> W_new` (None where the reference has no such pattern):
IST-DASLab/sparsegpt `SparseGPT.fasterprune`, fmfi-compbio/admm-pruning `AdmmPruner.fasterprune`,
mazumder-lab/ALPS `ALPS_prune.ALPS_admm`. Nothing of them is part of the project."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch


def _quiet(fn, *args, **kwargs):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def load_reference_sparsegpt(path: str | None):
    """fasterprune(W, H, pattern) -> W_new, from IST-DASLab/sparsegpt's sparsegpt.py."""
    if not path:
        return None
    sys.path.insert(0, str(Path(path).resolve()))
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # the reference calls it unconditionally
    from sparsegpt import SparseGPT  # noqa: E402  (the checkout's module)

    def run(W, H, pattern):
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = W.clone()
        pruner = SparseGPT(layer)
        pruner.H = H.clone()
        n, m = (pattern.m - pattern.n, pattern.m) if pattern.kind == "nm" else (0, 0)
        _quiet(pruner.fasterprune, pattern.sparsity, prunen=n, prunem=m, percdamp=0.01, blocksize=128)
        return layer.weight.data
    return run


def load_reference_admm(path: str | None):
    """fasterprune of fmfi-compbio/admm-pruning's lib/admm.py (2:4 and unstructured only: its N:M branch
    is written for groups of 4 keeping 2)."""
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("reference_admm", Path(path) / "lib" / "admm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(W, H, pattern):
        if pattern.kind == "nm" and (pattern.n, pattern.m) != (2, 4):
            return None
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
        layer.weight.data = W.clone()
        pruner = module.AdmmPruner(layer)
        pruner.XX = H.clone()
        n, m = (2, 4) if pattern.kind == "nm" else (0, 0)
        _quiet(pruner.fasterprune, pattern.sparsity, prune_n=n, prune_m=m, percdamp=0.1)
        return layer.weight.data
    return run


def load_reference_alps(path: str | None):
    """ALPS_prune.ALPS_admm of mazumder-lab/ALPS's alps.py, run from a copy whose hard-coded 'cuda:0' is
    pointed at the CPU when no GPU is there (its default rho 0.1, 300 steps, 10 CG steps)."""
    if not path:
        return None
    import tempfile

    source = (Path(path) / "alps.py").read_text()
    if not torch.cuda.is_available():
        source = source.replace("'cuda:0'", "'cpu'").replace('"cuda:0"', '"cpu"')
        torch.cuda.synchronize = lambda *a, **k: None  # the reference calls it unconditionally
    copy = Path(tempfile.mkdtemp(prefix="ref-alps-")) / "reference_alps.py"
    copy.write_text(source)
    spec = importlib.util.spec_from_file_location("reference_alps", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"

    def run(W, H, pattern):
        layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False).to(device)
        layer.weight.data = W.clone().to(device)
        pruner = module.ALPS_prune(layer, nsamples=1, seqlen=1)
        pruner.XtX = H.clone().float().to(device)
        n, m = (pattern.n, pattern.m) if pattern.kind == "nm" else (0, 0)  # its nm_n: the weights kept
        _quiet(pruner.ALPS_admm, pattern.sparsity, nm_n=n, nm_m=m, rho=0.1)
        return layer.weight.data.float().cpu()
    return run