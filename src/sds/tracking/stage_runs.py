"""One MLflow child run per stage: `track_stage` records it (with the stage's real start and end), a record
the store could not take is kept under results/<run>/mlflow_pending/ and `sync_pending` replays it."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from ..core.config import config_hash
from ..core.layout import RunLayout
from ..core.runtime import provenance
from ..core.stage_keys import resolved_config
from ..storage.documents import write_json
from .mlflow_store import _log_record, _store_lock, tracking_uri

log = logging.getLogger("sds.tracking")


def _process_start() -> float | None:
    """Wall-clock start of this process (Linux /proc), to within a clock tick; None elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def stage_start(started: float) -> float:
    """A stage run by Snakemake is its own process (`python -m sds.cli`, which Snakemake's benchmark
    times), so its run starts when the process did: imports and model loading are part of the stage.
    Called in-process (tests, notebooks), it starts when the stage function did."""
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main is not None and main.name in ("sds.cli", "sds.__main__"):
        return min(started, _process_start() or started)
    return started


def record_stage(config: dict, config_hash: str, stage: str, *, params: dict, metrics: dict | list,
                 artifacts: list[str] = (), parent_artifacts: list[str] = (), provenance: dict | None = None,
                 started: float | None = None, ended: float | None = None, parent_metrics: dict | None = None,
                 inputs: list[dict] = (), model: dict | None = None, tags: dict | None = None) -> bool:
    """Logs one stage (child run `stage`, spanning `started`..`ended`, epoch seconds); returns False (after
    a single warning) if the tracking store is unreachable. `parent_metrics` go on the pipeline's run,
    `inputs` (see `text_input`) are dataset inputs, `model` (see `model_entry`) a checkpoint to register."""
    if not config["mlflow"]["enabled"]:
        return True
    ended = time.time() if ended is None else ended
    started = ended if started is None else started
    if isinstance(metrics, dict):
        metrics = [(k, v, 0) for k, v in metrics.items()]
    record = {"run": config["run"], "experiment": config["mlflow"]["experiment"], "config": config,
              "config_hash": config_hash, "stage": stage, "params": params,
              "start_ms": int(started * 1000), "end_ms": int(ended * 1000),
              "metrics": [(k, float(v), int(s)) for k, v, s in metrics],
              "parent_metrics": {k: float(v) for k, v in (parent_metrics or {}).items()},
              "inputs": list(inputs), "model": model, "tags": {k: str(v) for k, v in (tags or {}).items() if v},
              "artifacts": [str(Path(a).resolve()) for a in artifacts],
              "parent_artifacts": [str(Path(a).resolve()) for a in parent_artifacts],
              "provenance": provenance or {}}
    try:
        with _store_lock():
            _log_record(record)
        return True
    except Exception as exc:  # any store failure must not lose the stage's results
        pending = Path(RunLayout(config["run"]).pending)
        pending.mkdir(parents=True, exist_ok=True)

        write_json(pending / f"{stage.replace('/', '_')}-{time.time_ns()}.json", record)
        log.warning("MLflow store %s unreachable (%s: %s); stage results are on disk and the record is kept in "
                    "%s for `python -m sds.cli sync`", tracking_uri(), type(exc).__name__, str(exc)[:300], pending)
        return False


def sync_pending(run: str) -> tuple[int, int]:
    """Replays records kept while the store was unreachable, oldest stage first; returns (logged, still
    pending). Records written before start/end were kept take the file's time; a damaged file is named and
    left in place (counted as pending), and the others are synced."""
    records, unreadable = [], 0
    for path in sorted(Path(RunLayout(run).pending).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            record.setdefault("end_ms", int(path.stat().st_mtime * 1000))
            record.setdefault("start_ms", record["end_ms"])
        except (OSError, ValueError, AttributeError, TypeError) as exc:  # damaged: left in place, named
            log.warning("sync: %s is not a readable record (%s); it is left in place, the others are synced",
                        path, str(exc)[:200])
            unreadable += 1
            continue
        records.append((record["start_ms"], path.name, path, record))
    done = 0
    for _, _, path, record in sorted(records, key=lambda r: r[:2]):
        try:
            with _store_lock():
                _log_record(record)
        except Exception as exc:
            log.warning("sync of %s failed: %s", path, exc)
            continue
        path.unlink()
        done += 1
    return done, len(records) - done + unreadable


def stage_seconds_file(run: str, stage: str) -> Path:
    """Where a stage's measured seconds are kept: beside Snakemake's benchmark file of its job
    (benchmarks/<stage>/<job>.seconds.json, the job named as RunLayout.benchmark names it), so the report
    reads the same number as the stage's MLflow run shows."""
    kind, *parts = stage.replace("+", "_").split("/")
    return Path(RunLayout(run).benchmark(kind, *parts)).with_suffix(".seconds.json")


def track_stage(config: dict, stage: str, *, started: float, params=None, metrics=None, artifacts=(),
                parent_artifacts=(), **extra) -> None:
    """Records a pipeline stage as an MLflow child run (`stage` unique within the pipeline) from `started`
    (time.time() when the stage began; under Snakemake its process's start) to now. That span is the
    stage's one duration: its run's start and end, its `seconds` metric, and the seconds file the report
    reads (written whether or not MLflow is on). `extra`: parent_metrics, inputs, model, tags."""
    ended = time.time()
    begun = stage_start(started)
    resolved = resolved_config(config)
    path = stage_seconds_file(resolved["run"], stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"stage": stage, "start": begun, "end": ended, "seconds": ended - begun})
    if isinstance(metrics, dict):
        metrics = [(k, v, 0) for k, v in metrics.items()]
    metrics = [m for m in metrics or [] if m[0] != "seconds"] + [("seconds", round(ended - begun, 3), 0)]
    record_stage(resolved, config_hash(resolved), stage, params=params or {}, metrics=metrics,
                 artifacts=list(artifacts), parent_artifacts=list(parent_artifacts), provenance=provenance(),
                 started=begun, ended=ended, **extra)


def close_pipeline(config: dict, status: str) -> str:
    """Ends the pipeline run of `config` (a resolved config): `status` FINISHED (at its last stage's end)
    or FAILED. Called once the whole Snakemake invocation is over (its onsuccess/onerror hook), so also on
    SLURM, where each stage is its own job. Returns the status set, '' if the config has no run (nothing
    logged yet, or MLflow off); kept for `sync` like a stage record if the store is unreachable."""
    if not config["mlflow"]["enabled"]:
        return ""
    now = int(time.time() * 1000)
    record = {"run": config["run"], "experiment": config["mlflow"]["experiment"], "config_hash": config_hash(config),
              "stage": "", "close": status, "start_ms": now, "end_ms": now}
    pending = Path(RunLayout(config["run"]).pending)
    try:
        with _store_lock():
            done = _log_record(record)
    except Exception as exc:  # as for a stage: kept for sync, after the stages' records
        done, reason = "", f"MLflow store {tracking_uri()} unreachable ({str(exc)[:300]})"
    else:
        reason = "stage records of this run are still pending"
    if not done and (reason.startswith("MLflow") or any(pending.glob("*.json"))):
        # replayed by sync after the stage records kept meanwhile (which create the run)
        pending.mkdir(parents=True, exist_ok=True)
        write_json(pending / f"pipeline-{status.lower()}-{time.time_ns()}.json", record)
        log.warning("%s; the pipeline's end is kept in %s for `python -m sds.cli sync`", reason, pending)
    return done
