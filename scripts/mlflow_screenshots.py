"""Screenshots of the MLflow UI for docs/mlflow.md, taken with Debian's headless Chromium.

    apt-get install -y chromium                       # once; not a dependency of the pipeline or its tests
    .venv/bin/python scripts/mlflow_screenshots.py --store results/mlflow.db --out docs/
    .venv/bin/python scripts/mlflow_screenshots.py --tracking-uri http://127.0.0.1:5000 --out /tmp/shots

With --store, a temporary `mlflow server` on 127.0.0.1 serves that SQLite store while the pictures are taken.
Pictures: the runs table (one row per pipeline config), its chart view (each headline metric as bars, one
per config), the per-layer error series of the newest pipeline's SDS second prune, the registered SDS
model's versions, the newest pipeline run's page (status, duration, datasets: mlflow-run.png), the same page
with its datasets panel opened on the calibration profile (mlflow-datasets.png, clicked), its report stage's
artifact view on report.html (mlflow-report-html.png) and the compare
view of every config's SDS second prune (mlflow-compare-stages.png). `--only` takes some of them, `--prefix`
renames them (e.g. `--only mlflow-runs.png mlflow-run.png --prefix running-` while a pipeline runs).

MLflow 3.17 opens its "MLflow Assistant" side panel on a new browser's first visit to a localhost address,
which squeezes every table to two thirds of the window. With --store the pages are shot under another name
for the same loopback server (Chromium maps it to 127.0.0.1; the server is told to accept it as host and origin), so the
pictures show the page as a user sees it after closing that panel once.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
VIEW = "workflowType=machine_learning"  # MLflow 3's model-training view (it opens on GenAI otherwise)
ALIAS = "sds-mlflow"  # the loopback server's name in the browser: not "localhost", so no assistant panel


def pages(api: str, experiment: str, uri: str | None = None) -> dict[str, str]:
    """File name → UI address (under `uri`, default `api`) of each picture, from the server at `api`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=api)
    uri = uri or api
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} at {api}: run the pipeline first")
    base = f"{uri}/#/experiments/{exp.experiment_id}"
    out = {"mlflow-runs.png": f"{base}/runs?{VIEW}", "mlflow-compare.png": f"{base}/runs?{VIEW}&compareRunsMode=CHART"}
    parents = client.search_runs([exp.experiment_id], "tags.sds_role = 'pipeline'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    if parents:
        config_hash = parents[0].data.tags["sds_config_hash"]
        prune2 = client.search_runs([exp.experiment_id], f"tags.sds_config_hash = '{config_hash}' and "
                                                         "tags.sds_kind = 'prune2'", max_results=1)
        out["mlflow-run.png"] = f"{base}/runs/{parents[0].info.run_id}?{VIEW}"
        out["mlflow-datasets.png"] = out["mlflow-run.png"]  # then its datasets panel opened (CLICKS)
        if prune2:
            out["mlflow-layers.png"] = f"{base}/runs/{prune2[0].info.run_id}/model-metrics?{VIEW}"
        stages = client.search_runs([exp.experiment_id], "tags.sds_kind = 'prune2'", max_results=10)
        if len(stages) > 1:
            ids = ",".join(f'"{r.info.run_id}"' for r in stages)
            out["mlflow-compare-stages.png"] = (f"{uri}/#/compare-runs?runs=[{ids}]&experiments=[\"{exp.experiment_id}\"]"
                                                f"&{VIEW}")
        report = client.search_runs([exp.experiment_id], f"tags.sds_config_hash = '{config_hash}' and "
                                                         "tags.sds_kind = 'report'", max_results=1)
        if report:  # the report stage's artifact view, opened on report.html (its figures inlined)
            out["mlflow-report-html.png"] = f"{base}/runs/{report[0].info.run_id}/artifacts/report.html?{VIEW}"
        models = client.search_registered_models(f"name LIKE 'sds-{parents[0].data.tags['sds_run']}-%'", max_results=1)
        if models:
            out["mlflow-registry.png"] = f"{uri}/#/models/{models[0].name}?{VIEW}"
    return out


# Pictures that need clicks: the page is driven over Chromium's DevTools protocol, each script run in turn.
_CLICK = ("(() => {{ const e = [...document.querySelectorAll('span, a, button')]"
          ".find(e => e.children.length === 0 && /{pattern}/.test(e.textContent));"
          " if (e) e.click(); return Boolean(e); }})()")
CLICKS = {
    # the run's Datasets section (a dataset's name: "<name> <windows>x<seqlen> (<digest>)") → its drawer →
    # the calibration dataset's profile
    "mlflow-datasets.png": [_CLICK.format(pattern=r"^\S+ \d+x\d+ \([0-9a-f]+\)$"),
                            _CLICK.format(pattern=r"^calibration \d+x\d+ \([0-9a-f]+\)$")],
}


def shoot_clicking(chromium: str, url: str, png: Path, size: str, scripts: list[str], settle_s: float,
                   flags: tuple[str, ...] = ()) -> None:
    """Opens `url` in a headless Chromium with a DevTools port, waits `settle_s` (real) seconds, runs each
    script (a click) with a few seconds after it, and saves a screenshot. aiohttp (installed with the
    pipeline's `datasets`) speaks the protocol's websocket."""
    import asyncio
    import base64
    import json
    import urllib.request

    import aiohttp

    width, height = (int(v) for v in size.split(","))

    async def drive(port: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as resp:
            page = next(t for t in json.load(resp) if t["type"] == "page")
        async with aiohttp.ClientSession() as session, session.ws_connect(page["webSocketDebuggerUrl"],
                                                                           max_msg_size=0) as ws:
            ids = iter(range(1, 1 << 30))

            async def call(method: str, **params):
                sent = next(ids)
                await ws.send_json({"id": sent, "method": method, "params": params})
                while (reply := await ws.receive_json()).get("id") != sent:
                    pass
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

            await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                       mobile=False)
            await call("Page.navigate", url=url)
            await asyncio.sleep(settle_s)
            for script in scripts:
                found = (await call("Runtime.evaluate", expression=script, returnByValue=True))["result"]
                if not found.get("value"):
                    raise SystemExit(f"{png.name}: nothing to click for {script}")
                await asyncio.sleep(4)
            return base64.b64decode((await call("Page.captureScreenshot", format="png"))["data"])

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        # its own process group, so the browser's helper processes end with it (by that group's id)
        proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, *flags, f"--user-data-dir={profile}",
                                 f"--window-size={size}", "--remote-debugging-port=0", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            active = Path(profile) / "DevToolsActivePort"  # Chromium writes its chosen port here
            for _ in range(300):
                if active.is_file() and active.read_text().strip():
                    break
                time.sleep(0.1)
            else:
                raise SystemExit("chromium opened no DevTools port within 30 s")
            png.write_bytes(asyncio.run(drive(active.read_text().split()[0])))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
    print(f"{png}  ←  {url} (clicked)")


def shoot(chromium: str, url: str, png: Path, size: str, waits_ms: list[int], flags: tuple[str, ...] = ()) -> None:
    """Charts render a while after the page and MLflow's auto-refresh turns them back into spinners for a
    moment, so the page is shot after each of a few (virtual) waits and the fullest picture is kept: the
    largest PNG, as spinners on white compress best."""
    with tempfile.TemporaryDirectory() as tmp:
        shots = []
        for i, wait in enumerate(waits_ms):
            shot = Path(tmp) / f"{i}.png"
            with tempfile.TemporaryDirectory() as profile:  # a fresh profile: what a new user sees
                subprocess.run([chromium, *CHROMIUM_FLAGS, *flags, f"--user-data-dir={profile}", f"--window-size={size}",
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
    ap.add_argument("--settle-s", type=float, default=25.0,
                    help="real seconds a page that needs clicks gets to render before them")
    ap.add_argument("--only", nargs="+", help="take only these pictures (file names)")
    ap.add_argument("--prefix", default="", help="put before each file name")
    args = ap.parse_args(argv)

    def take(api: str, ui: str | None = None, flags: tuple[str, ...] = ()) -> None:
        for name, url in pages(api, args.experiment, ui).items():
            if not args.only or name in args.only:
                png = args.out / f"{args.prefix}{name}"
                if name in CLICKS:
                    shoot_clicking(args.chromium, url, png, args.size, CLICKS[name], args.settle_s, flags)
                else:
                    shoot(args.chromium, url, png, args.size, args.wait_ms, flags)

    if not shutil.which(args.chromium):
        raise SystemExit("chromium not found: apt-get install -y chromium (or pass --chromium PATH)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tracking_uri:
        take(args.tracking_uri.rstrip("/"))
        return 0
    from sds.tracking.server import free_port, start, stop

    with tempfile.TemporaryDirectory() as state:
        os.environ["MLFLOW_SERVER_ALLOWED_HOSTS"] = f"{ALIAS}:*,127.0.0.1:*,localhost:*"
        os.environ["MLFLOW_SERVER_CORS_ALLOWED_ORIGINS"] = f"http://{ALIAS}:*"  # the UI's own searches are POSTs
        uri, _ = start(free_port(), state=Path(state), store=args.store)
        try:
            take(uri, uri.replace("127.0.0.1", ALIAS), (f"--host-resolver-rules=MAP {ALIAS} 127.0.0.1",))
        finally:
            stop(Path(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
