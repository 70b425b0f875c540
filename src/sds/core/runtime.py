"""What every stage process needs around its work: the device and thread set-up, progress lines, memory
figures, provenance for the records, and the fault-injection hook the reliability tests use.

Imports only torch and the standard library, so that a stage pays for nothing else it does not use.
"""
from __future__ import annotations

import logging
import os
import platform
import signal
import subprocess
import time
from pathlib import Path

import torch

log = logging.getLogger("sds")


def fault_injection(what: str, done: int) -> None:
    """Test hook: SDS_FAULT_KILL="<stage word>:<n>" SIGKILLs this process after step n of that stage, to
    prove that a killed stage leaves no partial output and that a re-run gives identical results."""
    spec = os.environ.get("SDS_FAULT_KILL")
    if spec:
        word, _, n = spec.partition(":")
        if what.startswith(word) and done == int(n or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def fault_pause(what: str, done: int) -> None:
    """Test hook: SDS_FAULT_SLEEP="<stage word>:<n>:<seconds>" holds the stage after it logged step n: a
    window in which a test can cancel the job from outside (scancel), whatever the machine's speed."""
    spec = os.environ.get("SDS_FAULT_SLEEP")
    if spec:
        word, n, seconds = spec.split(":")
        if what.startswith(word) and done == int(n):
            time.sleep(float(seconds))


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB. On Linux from VmHWM: ru_maxrss survives
    execve, so a stage started by a large parent (Snakemake, a benchmark) would report the parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def release_memory(device: torch.device | None = None) -> None:
    """Between layers: drop unreachable objects and hand freed heap pages back to the OS (glibc keeps
    freed chunks below its mmap threshold, such as per-sequence activations, in the heap); on a GPU,
    return cached blocks so the next layer's batches fit."""
    import ctypes
    import gc

    gc.collect()
    # What survives a full collection here (imported modules, the model) lives until the process ends;
    # frozen, the next call scans only what the layer since created (0.17 s → ms per layer at OPT-125M).
    # Reference counting still frees frozen tensors; only cycles among them would wait for the exit.
    gc.freeze()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()


class Progress:
    """Logs 'what i/n · elapsed · ETA' lines (to the terminal and the rule's log via stderr)."""

    def __init__(self, what: str, total: int, device: torch.device | None = None):
        self.what, self.total, self.start, self.device = what, total, time.monotonic(), device

    def __call__(self, done: int, total: int | None = None, extra: str = "") -> None:
        fault_injection(self.what, done)
        total = total or self.total
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (total - done) if done else float("nan")
        gpu = peak_gpu_mib(self.device) if self.device is not None else None
        memory = f"peak RSS {peak_rss_mib():.0f} MiB" + (f", peak GPU {gpu:.0f} MiB" if gpu is not None else "")
        log.info("%s %d/%d · elapsed %.1fs · ETA %.1fs · %s%s", self.what, done, total, elapsed, eta, memory,
                 f" · {extra}" if extra else "")
        fault_pause(self.what, done)


def seed(config: dict) -> None:
    """Seeds torch from the stage's `seed` key, or with 0 for stages that list none (they draw no random
    numbers; see core.stage_keys)."""
    torch.manual_seed(config.get("seed", 0))


def setup(config: dict) -> torch.device:
    """Threads, seed and the device of a stage that runs the model. Every solve runs in float32: TF32 matmuls (the CUDA
    default for cuDNN, and for matmul under some settings) would round the Hessians' products to 10-bit
    mantissas, so they are switched off."""
    torch.set_num_threads(config["threads"])
    seed(config)
    want = config["device"]
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config key 'device' = 'cuda' but CUDA is not available on this machine")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return torch.device("cuda" if use_cuda else "cpu")


def provenance() -> dict:
    rev = "unknown"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import version

    from .. import __version__

    return {"sds_version": __version__, "git_revision": rev, "torch_version": torch.__version__,
            "transformers_version": version("transformers"), "python_version": platform.python_version()}
