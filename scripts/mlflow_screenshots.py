"""Screenshots of the MLflow UI for docs/mlflow.md, taken with Debian's headless Chromium.

    apt-get install -y chromium                       # once; not a dependency of the pipeline or its tests
    .venv/bin/python scripts/mlflow_screenshots.py --store results/mlflow.db --out docs/
    .venv/bin/python scripts/mlflow_screenshots.py --tracking-uri http://127.0.0.1:5000 --out /tmp/shots

With --store, a temporary `mlflow server` on 127.0.0.1 serves that SQLite store while the pictures are taken.
Pictures: the runs table (one row per pipeline config), its chart view (each headline metric as bars, one
per config), the per-layer error series of the newest pipeline's SDS second prune, the registered SDS
model's versions, the newest pipeline run's page (status, duration, datasets: mlflow-run.png) and the compare
view of every config's SDS second prune (mlflow-compare-stages.png). `--only` takes some of them, `--prefix`
renames them (e.g. `--only mlflow-runs.png mlflow-run.png --prefix running-` while a pipeline runs).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
VIEW = "workflowType=machine_learning"  # MLflow 3's model-training view (it opens on GenAI otherwise)


def pages(uri: str, experiment: str) -> dict[str, str]:
    """File name → UI address of each picture."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} at {uri}: run the pipeline first")
    base = f"{uri}/#/experiments/{exp.experiment_id}"
    out = {"mlflow-runs.png": f"{base}/runs?{VIEW}", "mlflow-compare.png": f"{base}/runs?{VIEW}&compareRunsMode=CHART"}
    parents = client.search_runs([exp.experiment_id], "tags.sds_role = 'pipeline'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if parents:
        config_hash = parents[0].data.tags["sds_config_hash"]
        prune2 = client.search_runs([exp.experiment_id], f"tags.sds_config_hash = '{config_hash}' and "
                                                         "tags.sds_kind = 'prune2'", max_results=1)
        out["mlflow-run.png"] = f"{base}/runs/{parents[0].info.run_id}?{VIEW}"
        if prune2:
            out["mlflow-layers.png"] = f"{base}/runs/{prune2[0].info.run_id}/model-metrics?{VIEW}"
        stages = client.search_runs([exp.experiment_id], "tags.sds_kind = 'prune2'", max_results=10)
        if len(stages) > 1:
            ids = ",".join(f'"{r.info.run_id}"' for r in stages)
            out["mlflow-compare-stages.png"] = (f"{uri}/#/compare-runs?runs=[{ids}]&experiments=[\"{exp.experiment_id}\"]"
                                                f"&{VIEW}")
        models = client.search_registered_models(f"name LIKE 'sds-{parents[0].data.tags['sds_run']}-%'", max_results=1)
        if models:
            out["mlflow-registry.png"] = f"{uri}/#/models/{models[0].name}?{VIEW}"
    return out


def shoot(chromium: str, url: str, png: Path, size: str, waits_ms: list[int]) -> None:
    """Charts render a while after the page and MLflow's auto-refresh turns them back into spinners for a
    moment, so the page is shot after each of a few (virtual) waits and the fullest picture is kept: the
    largest PNG, as spinners on white compress best."""
    with tempfile.TemporaryDirectory() as tmp:
        shots = []
        for i, wait in enumerate(waits_ms):
            shot = Path(tmp) / f"{i}.png"
            with tempfile.TemporaryDirectory() as profile:  # a fresh profile: what a new user sees
                subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                                f"--virtual-time-budget={wait}", f"--screenshot={shot}", url],
                               check=True, capture_output=True, timeout=300)
            shots.append(shot)
        shutil.copyfile(max(shots, key=lambda p: p.stat().st_size), png)
    print(f"{png}  ←  {url}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--tracking-uri", help="a running MLflow server, http://host:port")
    where.add_argument("--store", type=Path, help="a SQLite store to serve meanwhile, e.g. results/mlflow.db")
    ap.add_argument("--experiment", default="sds")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    ap.add_argument("--size", default="1600,900", help="window width,height in pixels")
    ap.add_argument("--wait-ms", type=int, nargs="+", default=[20000, 30000, 45000, 60000],
                    help="virtual times the page gets to render; the fullest shot is kept")
    ap.add_argument("--only", nargs="+", help="take only these pictures (file names)")
    ap.add_argument("--prefix", default="", help="put before each file name")
    args = ap.parse_args(argv)

    def take(uri: str) -> None:
        for name, url in pages(uri, args.experiment).items():
            if not args.only or name in args.only:
                shoot(args.chromium, url, args.out / f"{args.prefix}{name}", args.size, args.wait_ms)

    if not shutil.which(args.chromium):
        raise SystemExit("chromium not found: apt-get install -y chromium (or pass --chromium PATH)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tracking_uri:
        take(args.tracking_uri.rstrip("/"))
        return 0
    from sds.tracking.server import free_port, start, stop

    with tempfile.TemporaryDirectory() as state:
        uri, _ = start(free_port(), state=Path(state), store=args.store)
        try:
            take(uri)
        finally:
            stop(Path(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
