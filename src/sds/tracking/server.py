"""An MLflow tracking server for the pipeline: SQLite backend and artifacts under results/ by default.

    python -m sds.tracking.server start [--port 5000] [--host 127.0.0.1]   # prints the tracking URI
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    python -m sds.tracking.server stop

    python -m sds.tracking.server start --store results/mlflow.db   # browse the default local store

On a cluster (docs/cluster.md): a server the compute nodes reach, with a database that is safe on a
shared file system (not SQLite), e.g. PostgreSQL:

    python -m sds.tracking.server start --host 0.0.0.0 --port 5000 \
        --backend-store-uri postgresql://sds@dbhost/mlflow --artifacts /shared/project/mlartifacts
    export MLFLOW_TRACKING_URI=http://$(hostname -f):5000      # what the jobs log to

Binds to 127.0.0.1 unless told otherwise (a tracking server has no authentication). The server runs in
the background; its pid and log are in results/mlflow-server/. Open the printed UI address: MLflow 3's UI
starts in its GenAI view, the address asks for the model-training one (the `Model training` switch).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..core.layout import MLFLOW_SERVER_STATE

STATE = Path(MLFLOW_SERVER_STATE)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def ui_address(url: str) -> str:
    """The UI's experiment list in its model-training view (MLflow 3 opens on GenAI otherwise)."""
    return f"{url}/#/experiments?workflowType=machine_learning"


def tracking_address(host: str, port: int) -> str:
    """The tracking URI to hand to the stages: a server bound to every interface is reached by this
    machine's name (compute nodes cannot use 127.0.0.1 to reach the login node)."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"http://{host}:{port}"


def start(port: int, host: str = "127.0.0.1", state: Path = STATE, timeout: float = 90.0,
          store: Path | None = None, backend: str | None = None, artifacts: str | Path | None = None
          ) -> tuple[str, int]:
    """Starts `mlflow server` and waits until it answers; returns (tracking URI, pid). The backend store:
    `backend` (any URI MLflow takes, e.g. postgresql://user@host/db), else `store` (an existing SQLite
    file, e.g. the pipeline's default results/mlflow.db), else state/mlflow.db. `artifacts`: where the
    server keeps artifacts (a folder or a URI such as s3://…), default state/artifacts."""
    state.mkdir(parents=True, exist_ok=True)
    local = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    url = f"http://[{local}]:{port}" if ":" in local else f"http://{local}:{port}"
    backend = backend or f"sqlite:///{Path(store or state / 'mlflow.db').resolve()}"
    if artifacts is None or "://" not in str(artifacts):
        artifacts = Path(artifacts or state / "artifacts").resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
    log = open(state / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
         "--backend-store-uri", backend, "--artifacts-destination", str(artifacts), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (state / "server.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode}; see {state / 'server.log'}")
        if _healthy(url):
            return (url if host == local else tracking_address(host, port)), proc.pid
        time.sleep(0.5)
    stop(state)
    raise TimeoutError(f"mlflow server did not answer on {url} within {timeout:.0f}s; see {state / 'server.log'}")


def stop(state: Path = STATE) -> bool:
    pid_file = state / "server.pid"
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    pid_file.unlink()
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sds.tracking.server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["start", "stop"])
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--store", type=Path, help="serve this SQLite store (e.g. results/mlflow.db)")
    ap.add_argument("--backend-store-uri", help="the server's database, e.g. postgresql://user@host/db (a cluster)")
    ap.add_argument("--artifacts", help="where the server keeps artifacts (a shared folder or a URI)")
    args = ap.parse_args(argv)
    if args.action == "start":
        url, pid = start(args.port, args.host, store=args.store, backend=args.backend_store_uri,
                         artifacts=args.artifacts)
        print(url)
        print(f"mlflow server pid {pid}; export MLFLOW_TRACKING_URI={url}; UI: {ui_address(url)}", file=sys.stderr)
    else:
        print("stopped" if stop() else "no server was running", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
