import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED_ASSETS = ROOT.parent / "shared" / "assets"

torch.set_num_threads(2)

# Settings for direct calls of the algorithms: the schema's defaults (config/schema.yaml holds each once).
from sds.core.config import defaults as _defaults  # noqa: E402

DEFAULTS = _defaults()
PRUNE, PRUNE2, RECON = DEFAULTS["prune"], DEFAULTS["prune2"], DEFAULTS["reconstruct"]["default"]
ADMM_PRUNER = {"iters": PRUNE["admm_iters"], "gradual_iters": PRUNE["admm_gradual_iters"],
               "percdamp": PRUNE["admm_percdamp"], "norm_floor": PRUNE["admm_norm_floor"]}
DENSE_ADMM = {"iters": RECON["iters"], "rho": RECON["rho"], "norm_floor": RECON["norm_floor"]}
MASKED_ADMM = {"iters": PRUNE2["adjust_iters"], "percdamp": PRUNE2["admm_percdamp"],
               "norm_floor": PRUNE2["admm_norm_floor"]}


def pytest_itemcollected(item):
    """Groups for pytest-xdist's `--dist loadgroup` (scripts/test.sh): the tests that read the session's
    micro workflow run share a worker, so it is built once; every other test runs on the worker of the rest
    of its module, so module-scoped runs are built once (and the SLURM cluster is started by one worker
    only). Without xdist the marks do nothing. Marked as each test is collected, before any
    `pytest_collection_modifyitems` (where xdist turns them into node-id suffixes); `built_once` fails a
    run where the grouping silently stops working."""
    uses_micro_run = "micro_run" in getattr(item, "fixturenames", ())
    item.add_marker(pytest.mark.xdist_group("micro_run" if uses_micro_run else item.module.__name__))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


def correlated_inputs(n_tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated features and uneven scales, like real LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g) / dim ** 0.5
    scales = torch.logspace(-1, 1, dim)
    latent = torch.randn(n_tokens, dim, generator=g)
    return (latent @ mixing + 0.3 * torch.randn(n_tokens, dim, generator=g)) * scales


def tiny_opt(layers=2, hidden=32, ffn=64, heads=2, vocab=128, positions=64):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
                    num_attention_heads=heads, max_position_embeddings=positions, word_embed_proj_dim=hidden,
                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return OPTForCausalLM(cfg).eval()


def save_tiny_opt_folder(out: Path, *, documents: int, vocab: int, hidden: int, ffn: int) -> Path:
    """A tiny random OPT (2 decoder layers) and a BPE tokenizer trained on generated text, saved at `out`
    as an external model folder (safetensors)."""
    from transformers import OPTForCausalLM

    from sds.demo.builder import make_opt_config, train_tokenizer
    from sds.demo.corpus import generate_corpus

    tok = train_tokenizer(generate_corpus(documents, 0), vocab)
    torch.manual_seed(0)
    OPTForCausalLM(make_opt_config(tok, layers=2, hidden=hidden, ffn=ffn, heads=2, max_positions=128)) \
        .save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def tiny_llama(layers=2, hidden=32, ffn=64, heads=4, vocab=128, positions=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
                      num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=positions)
    return LlamaForCausalLM(cfg).eval()


# --- the real workflow -------------------------------------------------------------------------------

# SDS_TEST_SNAKEFILE: drive another checkout's workflow with these tests (e.g. to show a test fails on main)
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", os.environ.get("SDS_TEST_SNAKEFILE", str(ROOT / "Snakefile"))]



def _quick_scontrol_dir() -> str:
    """A folder with a stand-in `scontrol` that fails at once. Snakemake's SLURM executor plugin runs
    `scontrol show config` whenever Snakemake starts (a 10 s timeout); with slurm-wlm installed and no
    controller running, every Snakemake start waited those 10 s for nothing. The tests' local runs put this
    first on PATH (the plugin then keeps its defaults); tests/test_slurm.py runs the real one."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="sds-test-bin-")
    atexit.register(shutil.rmtree, folder, True)
    stub = Path(folder) / "scontrol"
    stub.write_text("#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    return folder


LOCAL_PATH = f"{_quick_scontrol_dir()}{os.pathsep}{os.environ.get('PATH', '')}"


def snakemake(workdir: Path, *args: str, check=True, tracking_uri: str = "", env: dict | None = None
              ) -> subprocess.CompletedProcess:
    proc = subprocess.run([*SNAKEMAKE, "-d", str(workdir), *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PATH": LOCAL_PATH, "MLFLOW_TRACKING_URI": tracking_uri, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def planned_jobs(output: str) -> set[str]:
    """Rule names in the 'Job stats' table of a dry run."""
    m = re.search(r"Job stats:\n(.*?)\n\n", output + "\n\n", re.S)
    if not m:
        return set()
    rules = set()
    for line in m.group(1).splitlines()[2:]:
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            rules.add(parts[0])
    return rules


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on a free loopback port (SQLite backend), stopped afterwards."""
    from sds.tracking.server import free_port, start, stop

    state = tmp_path_factory.mktemp("mlflow-server")
    url, _ = start(free_port(), state=state)
    yield url
    stop(state)


def built_once(tmp_path_factory, what: str) -> None:
    """Fails when a second pytest-xdist worker of this run builds `what`: every user of a shared run must be
    on one worker (see pytest_itemcollected), or the run is built twice, silently (pytest 9.2 with
    pytest-xdist 3.8.0 dropped the groups: pytest-xdist#1386)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return
    claim = tmp_path_factory.getbasetemp().parent / f"built-{what}"  # the run's base folder, shared by workers
    try:
        fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        owner = claim.read_text() or "another worker"
        if owner != worker:
            pytest.fail(f"{what} is built by both {owner} and {worker}: the tests using it were not grouped on "
                        f"one worker (pytest-xdist --dist loadgroup; see tests/conftest.py)")
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(worker)


def copy_run(micro_run, tmp_path) -> Path:
    """A private copy of the finished micro run (outputs, mtimes and Snakemake's records) to change or damage."""
    import shutil

    work, _, _ = micro_run
    copy = tmp_path / "w"
    shutil.copytree(work, copy, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db"))
    return copy


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory, mlflow_server):
    """The micro workflow, logging over HTTP to the real MLflow server."""
    built_once(tmp_path_factory, "micro_run")
    work = tmp_path_factory.mktemp("micro")
    cfg = work / "micro.yaml"
    cfg.write_text((ROOT / "config" / "micro.yaml").read_text())
    proc = snakemake(work, "--cores", "2", "--configfile", str(cfg), tracking_uri=mlflow_server)
    return work, cfg, proc


