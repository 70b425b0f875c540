"""What every stage process needs around its work: the device and thread set-up (with a card of its own on
a machine with several), progress lines, memory figures, provenance for the records, and the
fault-injection hook the reliability tests use.

Imports only torch, the standard library and core.errors, so that a stage pays for nothing else it does not use.
"""
from __future__ import annotations

import logging
import os
import platform
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from .errors import DeviceError

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


# A local run with several cards (`snakemake --cores N --resources gpu=N`) starts GPU stages side by side,
# and CUDA would put each on card 0. Instead each stage takes a card no other stage holds: an exclusive
# flock on that card's lock file, held until the process ends (the kernel drops it however it ends).
# (card index, lock file descriptor) of this process, once it has one: a process that runs several stages
# (tests, benches) keeps its card rather than lock a second one, or wait for itself.
_HELD_CARD: list[tuple[int, int]] = []
CARD_POLL_S = 2.0


def card_names(count: int, visible: str | None) -> list[str]:
    """Machine-wide names of the `count` cards this process sees, in CUDA's index order: the entries of
    CUDA_VISIBLE_DEVICES where it is set (physical indices or UUIDs, so processes that were shown different
    cards do not block each other), else the indices themselves."""
    named = [entry.strip() for entry in (visible or "").split(",") if entry.strip()]
    return named[:count] if len(named) >= count else [str(i) for i in range(count)]


def gpu_lock_dir(environ=os.environ) -> Path:
    """Where the card locks of this user live: the system temp folder (local to the machine, unlike a
    results folder on NFS), one folder per SLURM job, since the cards of jobs that share a node are
    numbered from 0 in each."""
    scope = f"slurm-job-{environ['SLURM_JOB_ID']}" if environ.get("SLURM_JOB_ID") else "machine"
    return Path(tempfile.gettempdir()) / f"sds-gpu-locks-{os.getuid()}" / scope


def _try_lock(path: Path) -> int | None:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def claim_card(cards: list[str], lock_dir: Path, poll_s: float = CARD_POLL_S) -> tuple[int, int]:
    """(index into `cards` of the first card no other holder has locked, the lock's file descriptor). With
    every card held it waits for one rather than share: two stages on one card would compete for its memory
    (and their batch sizes assume the whole card)."""
    lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = [lock_dir / f"card-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock" for name in cards]
    waiting_since = None
    while True:
        for index, path in enumerate(paths):
            fd = _try_lock(path)
            if fd is not None:
                if waiting_since is not None:
                    log.info("GPU %s free after %.0fs", cards[index], time.monotonic() - waiting_since)
                return index, fd
        if waiting_since is None:
            log.info("all %d GPUs (%s) are held by other sds stages (locks in %s): waiting for one", len(cards),
                     ", ".join(cards), lock_dir)
            waiting_since = time.monotonic()
        time.sleep(poll_s)


def _cuda_device() -> torch.device:
    """One card: CUDA's default, as ever. Several: a free one, made the current device (CUDA streams,
    pinned copies and memory queries that name no index then use it too)."""
    count = torch.cuda.device_count()
    if count < 2:
        return torch.device("cuda")
    if not _HELD_CARD:
        cards = card_names(count, os.environ.get("CUDA_VISIBLE_DEVICES"))
        _HELD_CARD.append(claim_card(cards, gpu_lock_dir()))
        log.info("on GPU cuda:%d (%s of %d visible), held by this stage until it ends", _HELD_CARD[0][0],
                 cards[_HELD_CARD[0][0]], count)
    index = _HELD_CARD[0][0]
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


# glibc serves allocations below its mmap threshold from the heap, and raises that threshold (up to 32 MiB)
# each time a larger block is freed: a layer's weights and activations (tens of MiB at 8B width) then stay
# in the heap, fragmented, and a stage's memory creeps up layer after layer. A fixed 1 MiB threshold hands
# every tensor-sized block back to the OS when freed, so peak memory stays flat in depth.
M_MMAP_THRESHOLD = -3


def allocate_tensors_by_mmap() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc
        pass


def setup(config: dict) -> torch.device:
    """Threads, seed and the device of a stage that runs the model. Every solve runs in float32: TF32 matmuls (the CUDA
    default for cuDNN, and for matmul under some settings) would round the Hessians' products to 10-bit
    mantissas, so they are switched off."""
    torch.set_num_threads(config["threads"])
    allocate_tensors_by_mmap()
    seed(config)
    want = config["device"]
    if want == "cuda" and not torch.cuda.is_available():
        raise DeviceError("config key 'device' = 'cuda' but CUDA is not available on this machine (no GPU "
                          "visible, or a CPU-only build of torch): set device to 'auto' or 'cpu'")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return _cuda_device() if use_cuda else torch.device("cpu")


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
