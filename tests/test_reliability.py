"""Faults: killed stages, corrupt files (ours and a user's), full disks, read-only folders, concurrent and
edited runs, numerical trouble; determinism across processes; security defaults as they behave."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import LOCAL_PATH, ROOT, copy_run, snakemake, tiny_opt


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*.xxh3"))}


@pytest.mark.parametrize("rule,output", [("prune1", "sparsegpt/2of4/prune1"),
                                         ("reconstruct", "sparsegpt/2of4/default/reconstruct")])
def test_killed_stage_leaves_nothing_and_rerun_is_bit_identical(micro_run, tmp_path, rule, output):
    work = copy_run(micro_run, tmp_path)
    cfg = work / "micro.yaml"
    target = work / "results" / "micro" / output
    before = _digests(target)
    assert before, "the finished run recorded checksums"
    env = {**os.environ, "PATH": LOCAL_PATH, "MLFLOW_TRACKING_URI": "", "SDS_FAULT_KILL": f"{rule}:1"}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work),
                           "--cores", "1", "--configfile", str(cfg), "--forcerun", rule, "--until", rule],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode != 0, "the stage was killed (SIGKILL after its first layer)"
    assert not target.exists(), "a killed stage leaves no output behind"
    snakemake(work, str(target.relative_to(work)), "--cores", "1", "--configfile", str(cfg))
    assert _digests(target) == before, "the re-run reproduces the uninterrupted run bit for bit"
    assert not list(target.parent.glob(f".{target.name}.*.tmp")), "stale temporaries were cleaned up"


def test_corrupt_cache_is_named_then_recreated(micro_run, tmp_path):
    work = copy_run(micro_run, tmp_path)
    cfg = work / "micro.yaml"
    cache = work / "results" / "micro" / "activations" / "input" / "layer_000.parquet"
    before = _digests(cache.parent)
    cache.write_bytes(cache.read_bytes()[:-100])
    proc = snakemake(work, "--cores", "1", "--configfile", str(cfg), "--forcerun", "prune1", "--until", "prune1",
                     check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(r"layer_000\.parquet: checksum mismatch \(truncated or altered\)", text), text[-3000:]
    assert "run the same snakemake command again" in text
    assert not cache.parent.exists()
    snakemake(work, "results/micro/sparsegpt/2of4/prune1", "--cores", "1", "--configfile", str(cfg))
    assert _digests(cache.parent) == before


def test_nan_activations_name_the_layer():
    from sds.core.errors import NumericalError
    from sds.model.statistics import collect_stats
    from sds.model.decoder import decoder_layers, layer_kwargs

    model = tiny_opt()
    bad = torch.randn(16, 32)
    bad[3, 5] = float("nan")
    with pytest.raises(NumericalError, match="layer 7 inputs of"):
        collect_stats(decoder_layers(model)[0], [bad], layer_kwargs(model, 16), layer_name="layer 7")


def test_hessian_solve_falls_back_to_stronger_dampening():
    from sds.algorithms.sparsegpt import inverse_hessian_cholesky

    g = torch.Generator().manual_seed(0)
    A = torch.randn(16, 16, generator=g)
    H = A @ A.T
    H -= 1.5 * torch.linalg.eigvalsh(H).max() * 0.01 * torch.eye(16) * 10  # indefinite at 1% dampening
    assert torch.linalg.eigvalsh(H).min() < 0
    U, damp = inverse_hessian_cholesky(H, 0.01)
    assert damp > 0.01 and torch.isfinite(U).all()
    with pytest.raises(FloatingPointError, match="not positive definite"):
        inverse_hessian_cholesky(-torch.eye(4) * 1e6, 0.01, max_tries=2)


def test_too_short_calibration_text_is_named():
    from sds.core.errors import DataError
    from sds.data.windows import sample_windows

    with pytest.raises(DataError, match="calibration text has 10 tokens, fewer than one window of seqlen=64"):
        sample_windows(torch.arange(10), 4, 64, 0)


def test_layer_parallel_reconstruction_equals_single_job(micro_run, tmp_path):
    """One job per decoder layer + gather gives the very same checkpoint as the single-job mode."""
    import yaml

    work = copy_run(micro_run, tmp_path)
    cfg = yaml.safe_load((work / "micro.yaml").read_text())
    cfg["layer_parallel"] = True
    parallel_cfg = work / "parallel.yaml"
    parallel_cfg.write_text(yaml.safe_dump(cfg))
    target = work / "results" / "micro" / "sparsegpt" / "2of4" / "default" / "reconstruct"
    single = load_weights(target)
    from conftest import planned_jobs

    plan = snakemake(work, str(target.relative_to(work)), "-n", "--forcerun", "reconstruct_gather", "--cores", "2",
                     "--configfile", str(parallel_cfg)).stdout
    assert {"reconstruct_layer", "reconstruct_gather"} <= planned_jobs(plan)
    snakemake(work, str(target.relative_to(work)), "--forcerun", "reconstruct_gather", "--cores", "2",
              "--configfile", str(parallel_cfg))
    assert (target.parent / "reconstruct_layers" / "1" / "weights.safetensors").is_file()
    parallel = load_weights(target)
    assert parallel.keys() == single.keys()
    for key in single:
        assert torch.equal(parallel[key], single[key]), key


def load_weights(folder):
    from sds.storage.safetensors import load_tensors

    return load_tensors(folder / "weights.safetensors")


# --- stages on a tiny model, each as its own process (as Snakemake runs them) -----------------------------
# The run is named exp1 and its model is a user's folder at results/exp1/model, given as model.source: the
# very place (and folder names) the old name-based clean-up treated as a stage output.

RUN = "exp1"


def _cli(workdir: Path, *args: str, limit_file_size: int | None = None, check=False, prefix=()):
    """`python -m sds.cli ARGS` in `workdir` (Snakemake's working directory), optionally under a file-size
    limit (RLIMIT_FSIZE: a write past it fails with EFBIG, as on a full disk)."""
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    proc = subprocess.run([*prefix, sys.executable, "-m", "sds.cli", *args], cwd=workdir, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit if limit_file_size else None,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "MLFLOW_TRACKING_URI": ""})
    if check and proc.returncode:
        raise AssertionError(f"sds {args[0]} failed:\n{proc.stderr[-3000:]}")
    return proc


def _error_line(proc) -> str:
    """The CLI's one error line (its other stderr lines are progress logs); no traceback allowed."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sds ") and ": error: " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _save_user_model(folder: Path) -> None:
    """A tiny OPT and a word-level tokenizer, saved as a user would (no checksum sidecars, no record)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tiny_opt(vocab=128, positions=64).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", pad_token="t1"
                            ).save_pretrained(folder)


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
    """A working directory with the user's model, a config and this run's calibration and layer-0 inputs."""
    import json
    import random

    from sds.core.config import validate_config

    work = tmp_path_factory.mktemp("stages")
    model = work / "results" / RUN / "model"
    _save_user_model(model)
    rng = random.Random(0)
    (work / "calib.txt").write_text(" ".join(f"t{rng.randrange(2, 128)}" for _ in range(3000)))
    cfg = validate_config({"run": RUN, "threads": 1, "model": {"source": str(model)},
                           "calibration": {"source": str(work / "calib.txt"), "nsamples": 4, "seqlen": 32},
                           "evaluate": {"datasets": {"calib": str(work / "calib.txt")}, "seqlen": 32,
                                        "max_windows": 4, "zeroshot": {"enabled": False}},
                           "mlflow": {"enabled": False}})
    (work / "config.json").write_text(json.dumps(cfg))
    r = f"results/{RUN}"
    _cli(work, "calibration", "--config", "config.json", f"model_dir={model}", "corpus_dir=",
         f"out={r}/calibration.parquet", check=True)
    _cli(work, "layer_inputs", "--config", "config.json", f"model_dir={model}",
         f"calibration_file={r}/calibration.parquet", f"out={r}/activations/input", check=True)
    return work


def _private_copy(stage_run, tmp_path) -> Path:
    work = tmp_path / "w"
    shutil.copytree(stage_run, work)
    return work


def _prune1(work: Path, out: str = f"results/{RUN}/sparsegpt/2of4/prune1", **kw):
    r = f"results/{RUN}"
    return _cli(work, "prune1", "--config", "config.json", f"model_dir={work / r / 'model'}",
                f"inputs_dir={r}/activations/input", "method=sparsegpt", "pattern=2of4", f"out={out}", **kw)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", ["prune1", "evaluate"])  # the layer-wise loader and the whole-model one
def test_truncated_user_model_is_named_and_nothing_is_deleted(stage_run, tmp_path, stage):
    work = _private_copy(stage_run, tmp_path)
    weights = work / "results" / RUN / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = _tree(work / "results")
    if stage == "prune1":
        proc = _prune1(work)
    else:
        proc = _cli(work, "evaluate", "--config", "config.json", f"model_dir={weights.parent}",
                    f"out=results/{RUN}/eval/dense.json")
    assert proc.returncode == 1
    line = _error_line(proc)
    assert f"{weights}: not a readable safetensors file (truncated:" in line and "Nothing was deleted" in line, line
    assert _tree(work / "results") == before, "the user's model (and everything else) is untouched"


def test_corrupt_cache_of_this_run_is_removed_by_the_cli(stage_run, tmp_path):
    work = _private_copy(stage_run, tmp_path)
    inputs = work / "results" / RUN / "activations" / "input"
    (inputs / "layer_000.parquet").write_bytes((inputs / "layer_000.parquet").read_bytes()[:-50])
    proc = _prune1(work)
    line = _error_line(proc)
    assert "layer_000.parquet: checksum mismatch" in line and f"Removed results/{RUN}/activations/input " in line
    assert not inputs.exists() and (work / "results" / RUN / "model" / "model.safetensors").is_file()


def test_prune1_run_twice_as_processes_gives_identical_files(stage_run, tmp_path):
    """Same config, same inputs, two processes: every output file equal byte for byte."""
    work = _private_copy(stage_run, tmp_path)
    out = work / "results" / RUN / "sparsegpt" / "2of4" / "prune1"
    _prune1(work, check=True)
    first = _tree(out)
    out.rename(out.with_name("prune1-first"))
    _prune1(work, check=True)
    second = _tree(out)
    assert {"weights.safetensors", "masks.safetensors", "layers.json", "stats/layer_001.safetensors"} <= set(first)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []


def _assert_nothing_left(work: Path, before: dict[str, bytes]) -> None:
    assert _tree(work / "results") == before, "no partial output, no temporary, nothing changed"


def test_file_size_limit_during_a_stage_write_gives_one_line_and_no_partial_output(stage_run, tmp_path):
    """A write failing mid-stage (EFBIG past RLIMIT_FSIZE, what a full disk gives as ENOSPC)."""
    work = _private_copy(stage_run, tmp_path)
    before = _tree(work / "results")
    proc = _prune1(work, limit_file_size=20_000)  # below the size of prune1's weights file
    assert proc.returncode == 1
    line = _error_line(proc)
    assert re.search(rf"cannot write results/{RUN}/sparsegpt/2of4/prune1/\S+: File too large", line), line
    _assert_nothing_left(work, before)


def _namespace_prefix(script: str) -> list[str]:
    """Runs a mount setup in a private mount namespace, then the command; skips where that is not allowed."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"cannot mount in a private namespace here: {probe.stderr.strip()}")
    return ["unshare", "-m", "sh", "-c", script + ' && exec "$@"', "sh"]


def test_full_disk_during_a_stage_write_gives_one_line_and_no_partial_output(stage_run, tmp_path):
    """ENOSPC for real: the method's folder is a 64 KiB tmpfs (private to the stage's mount namespace),
    too small for prune1's output; afterwards the stage itself reports what is left there."""
    work = _private_copy(stage_run, tmp_path)
    target = work / "results" / RUN / "sparsegpt"
    target.mkdir()
    report = ("import os, sys; from pathlib import Path; rc = __import__('sds.cli').cli.main(sys.argv[1:]); "
              f"print('LEFT', sorted(str(p) for p in Path({str(target)!r}).rglob('*')), file=sys.stderr); sys.exit(rc)")
    prefix = _namespace_prefix(f"mount -t tmpfs -o size=64k tmpfs {target}")
    r = f"results/{RUN}"
    proc = subprocess.run([*prefix, sys.executable, "-c", report, "prune1", "--config", "config.json",
                           f"model_dir={work / r / 'model'}", f"inputs_dir={r}/activations/input", "method=sparsegpt",
                           "pattern=2of4", f"out={r}/sparsegpt/2of4/prune1"], cwd=work, capture_output=True, text=True,
                          timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 1
    line = _error_line(proc)
    assert re.search(rf"cannot write {r}/sparsegpt/2of4/prune1/\S+: No space left on device", line), line
    left = next(l for l in proc.stderr.splitlines() if l.startswith("LEFT "))
    assert left == f"LEFT {[str(target / '2of4')]}", "only the (empty) parent folder Snakemake would make"


def test_read_only_results_folder_gives_one_line_and_writes_nothing(stage_run, tmp_path):
    work = _private_copy(stage_run, tmp_path)
    before = _tree(work / "results")
    run_dir = work / "results" / RUN
    if os.geteuid() == 0:  # root writes through permission bits: a read-only bind mount instead
        prefix = _namespace_prefix(f"mount --bind {run_dir} {run_dir} && mount -o remount,bind,ro {run_dir}")
        proc = _prune1(work, prefix=prefix)
    else:
        run_dir.chmod(0o555)
        try:
            proc = _prune1(work)
        finally:
            run_dir.chmod(0o755)
    assert proc.returncode == 1
    line = _error_line(proc)
    assert re.search(rf"cannot write results/{RUN}/sparsegpt: (Read-only file system|Permission denied)", line), line
    _assert_nothing_left(work, before)


# --- untrusted checkpoints -----------------------------------------------------------------------------

class _Sentinel:
    """A pickle that, when loaded, creates the file it names: proof that unpickling happened."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _config_json(tmp_path) -> Path:
    """A config validated against a good model folder; the stages are then pointed at the folder under
    test (as if it changed after validation, which checks it too: see the pickle test)."""
    import json

    from sds.core.config import validate_config

    good = tmp_path / "good-model"
    _save_user_model(good)
    (tmp_path / "text.txt").write_text(" ".join(f"t{i % 120 + 2}" for i in range(400)))
    cfg = validate_config({"run": RUN, "threads": 1, "model": {"source": str(good)}, "mlflow": {"enabled": False},
                           "calibration": {"source": str(tmp_path / "text.txt"), "nsamples": 2, "seqlen": 16},
                           "evaluate": {"datasets": {"calib": str(tmp_path / "text.txt")}, "seqlen": 16,
                                        "max_windows": 2, "zeroshot": {"enabled": False}}})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "config.json"


@pytest.mark.parametrize("stage", ["evaluate", "prune1"])
def test_pickle_checkpoint_is_refused_and_never_unpickled(tmp_path, monkeypatch, capsys, stage):
    from sds.cli import main

    model = tmp_path / "user-model"
    _save_user_model(model)
    sentinel = tmp_path / "unpickled"
    (model / "model.safetensors").unlink()
    torch.save({"weights": _Sentinel(sentinel)}, model / "pytorch_model.bin")  # a pickle, nothing else
    cfg = _config_json(tmp_path)
    from sds.core.errors import ConfigError
    from sds.core.config import validate_config

    with pytest.raises(ConfigError, match=r"user-model. has no \*.safetensors weights \(only safetensors checkpoints"):
        validate_config({"run": RUN, "model": {"source": str(model)}, "calibration": {"source": str(cfg)}})
    monkeypatch.chdir(tmp_path)
    args = {"evaluate": [f"model_dir={model}", "corpus_dir=", "out=e.json"],
            "prune1": [f"model_dir={model}", "inputs_dir=d", "method=magnitude", "pattern=2of4", "out=p"]}[stage]
    assert main([stage, "--config", str(cfg), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"sds {stage}: error: model path") and "only safetensors checkpoints are loaded" in err
    assert not sentinel.exists() and not (tmp_path / "e.json").exists() and not (tmp_path / "p").exists()


def test_pickle_beside_safetensors_is_never_opened(tmp_path, monkeypatch):
    from sds.cli import main

    model = tmp_path / "user-model"
    _save_user_model(model)
    sentinel = tmp_path / "unpickled"
    torch.save({"weights": _Sentinel(sentinel)}, model / "pytorch_model.bin")
    cfg = _config_json(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--config", str(cfg), f"model_dir={model}", "corpus_dir=", "out=e.json"]) == 0
    assert (tmp_path / "e.json").is_file() and not sentinel.exists()


@pytest.mark.parametrize("model_type, stage", [("sds_custom", "activations"), ("opt", "evaluate")])
def test_code_bearing_checkpoint_never_runs_its_code(tmp_path, monkeypatch, capsys, model_type, stage):
    """config.json's auto_map names custom code (which here creates a file when imported). With
    trust_remote_code off (the default) an architecture the library does not know is refused in one line,
    and a known one is built from the library's own code; the custom module is never imported."""
    import json

    from sds.cli import main

    model = tmp_path / "user-model"
    _save_user_model(model)
    sentinel = tmp_path / "code-ran"
    (model / "custom_model.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "custom_model.CustomConfig",
                                                   "AutoModelForCausalLM": "custom_model.CustomModel"})
    (model / "config.json").write_text(json.dumps(config))
    cfg = _config_json(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = {"evaluate": [f"model_dir={model}", "corpus_dir=", "out=out"],
            "activations": [f"model_dir={model}", "calibration_file=c.parquet", "out=out"]}[stage]
    rc = main([stage, "--config", str(cfg), *args])
    err = capsys.readouterr().err
    if model_type == "opt":
        assert rc == 0 and (tmp_path / "out").is_file()
    else:
        assert rc == 1 and "Traceback" not in err, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"sds {stage}: error:") and str(model) in line, line
        assert "trust_remote_code" in line or "unsupported architecture" in line, line
        assert not (tmp_path / "out").exists()
    assert not sentinel.exists(), "the checkpoint's own code ran"


# --- the MLflow helper binds loopback only -------------------------------------------------------------

def _listening_addresses(port: int) -> set[str]:
    """The local addresses of sockets listening on `port` (read from the kernel's tables)."""
    import ipaddress

    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            host, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(host)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
            found.add(str(ipaddress.ip_address(raw)))
    return found


def test_mlflow_server_command_binds_loopback_by_default(tmp_path):
    import urllib.request

    from sds.tracking.server import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = subprocess.run([sys.executable, "-m", "sds.tracking.server", "start", "--port", str(port)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=180, env=env)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        assert start.stdout.strip() == f"http://127.0.0.1:{port}"
        assert _listening_addresses(port) == {"127.0.0.1"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            assert resp.status == 200
    finally:
        subprocess.run([sys.executable, "-m", "sds.tracking.server", "stop"], cwd=tmp_path, capture_output=True,
                       timeout=60, env=env)
    assert _listening_addresses(port) == set(), "stopped"


def test_listening_address_reader_sees_a_wildcard_bind():
    """The check above could pass vacuously if it misread the kernel's table: a socket bound to all
    interfaces must show up as such."""
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        assert _listening_addresses(s.getsockname()[1]) == {"0.0.0.0"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert _listening_addresses(s.getsockname()[1]) == {"127.0.0.1"}


# --- concurrent and edited runs -------------------------------------------------------------------------

@pytest.mark.slow
def test_second_run_is_locked_out_and_a_config_edit_mid_run_changes_nothing(micro_run, tmp_path):
    """While a run is going: the same workflow started again stops with Snakemake's lock error, and the
    config file is edited and dry-run (a user checking what the edit would re-run). The first run finishes
    on the config it started with: every record it writes (evaluation JSON, MLflow runs) carries that
    config's hash."""
    import json
    import time

    import yaml

    from sds.core.config import config_hash, validate_config

    work = copy_run(micro_run, tmp_path)
    cfg = work / "micro.yaml"
    started_with = config_hash(validate_config(yaml.safe_load(cfg.read_text())))
    evals = work / "results" / "micro" / "eval"
    # The first run re-runs prune2 and what follows it (evaluate_sds, report); its prune2 holds for 30 s after
    # its first layer (the stages' test hook), so the second run, the edit and the dry run all happen while
    # it is going, on any machine, and the jobs after prune2 start after the edit.
    env = {**os.environ, "PATH": LOCAL_PATH, "MLFLOW_TRACKING_URI": "", "SDS_FAULT_SLEEP": "prune2:1:30"}
    first = subprocess.Popen([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(work),
                              "--cores", "1", "--configfile", str(cfg), "--forcerun", "prune2"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        locks = work / ".snakemake" / "locks"
        deadline = time.monotonic() + 120
        while not (locks.is_dir() and any(locks.iterdir())):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.2)
        second = snakemake(work, "--cores", "1", "--configfile", str(cfg), check=False)
        assert second.returncode != 0
        said = (second.stdout + second.stderr).splitlines()
        # Snakemake refuses in one of two ways, depending on whether the first run's job is already in flight
        # when the second builds its DAG: the lock error, or the in-flight output flagged as incomplete
        refused = [line for line in said if line.startswith("Error: Directory cannot be locked.")
                   or line.startswith("IncompleteFilesException")]
        assert len(refused) == 1, second.stderr[-3000:]
        edited = yaml.safe_load(cfg.read_text())
        edited["evaluate"]["max_windows"] = 4
        cfg.write_text(yaml.safe_dump(edited))
        edited_at = time.time()
        # parses the edited config (Snakemake then stops on the files the first run has in progress)
        snakemake(work, "-n", "--configfile", str(cfg), check=False)
        assert first.poll() is None, "the first run was still going during the edit (else this tests nothing)"
        out, _ = first.communicate(timeout=900)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out[-4000:]
    records = [json.loads(p.read_text()) for p in sorted(evals.rglob("*.json"))]
    assert len(records) == 4 and {r["config_hash"] for r in records} == {started_with}
    assert all(r["windows"]["builtin"] == 8 for r in records), "evaluated with the config it started with"
    assert (evals / "sparsegpt" / "2of4" / "default" / "sds.json").stat().st_mtime > edited_at, \
        "the SDS evaluation ran after the edit (so it shows the first run kept its config)"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'results' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and {r.data.tags["sds_config_hash"] for r in runs} == {started_with}
    assert not list((work / "results").rglob("*.tmp"))
