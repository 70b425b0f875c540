"""Hugging Face sources a config names, read offline from the local caches (nothing is downloaded at run
time): `hf:<dataset>[:<config>[:<split>]]` text sources, loaded here for the stages and checked here before
any work (`hf_dataset_errors`), so a dataset missing from the cache is named in one line before a stage runs;
and `hub_offline`, which every reader of a Hub cache calls first. (A model id is resolved by
core.architectures.resolve_model_dir, checked by core.config's model checks.)"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Mapping

from .errors import DataError

HF_PREFIX = "hf:"
# The split a text source without one reads: calibration the training text, perplexity the held-out one.
CALIBRATION_SPLIT, EVALUATION_SPLIT = "train", "test"
EVALUATION_TEXT_FIELD = "text"  # the evaluation's text sources name no field


def hub_offline() -> None:
    """Nothing is downloaded at run time: `datasets` and the Hub client read local files and caches only.
    Sets HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 unless the user set them, also in modules that have
    already read them at import."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hub = os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
    ds = os.environ["HF_DATASETS_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = hub
    if "datasets.config" in sys.modules:
        sys.modules["datasets.config"].HF_HUB_OFFLINE = ds
        sys.modules["datasets.config"].HF_DATASETS_OFFLINE = ds


def parse_hf_dataset(source: str, default_split: str) -> tuple[str, str | None, str]:
    """(dataset, config or None, split) of 'hf:<dataset>[:<config>[:<split>]]'."""
    parts = source[len(HF_PREFIX):].split(":")
    name, cfg = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
    split = parts[2] if len(parts) > 2 and parts[2] else default_split
    return name, cfg, split


def load_hf_dataset(source: str, default_split: str, *, quiet: bool = False):
    """The `datasets.Dataset` an hf: source names, from the local datasets cache (or a local dataset folder);
    raises DataError in one line naming it, the split and the cache. `quiet`: without datasets' own log lines
    and progress bars (a check's output is its errors)."""
    name, cfg, split = parse_hf_dataset(source, default_split)
    hub_offline()
    try:
        import datasets

        with _quiet_datasets(quiet):
            return datasets.load_dataset(name, cfg, split=split)
    except Exception as exc:
        from datasets.config import HF_DATASETS_CACHE

        reason = " ".join(str(exc).split())[:300]
        raise DataError(f"dataset {source!r} (split {split!r}) is not in the local datasets cache "
                        f"({HF_DATASETS_CACHE}) and nothing is downloaded at run time: load it once beforehand "
                        f"with network access, or give a local file ({reason})") from None


@contextlib.contextmanager
def _quiet_datasets(quiet: bool):
    if not quiet:
        yield
        return
    from datasets.utils import logging as ds_logging

    verbosity, bars = ds_logging.get_verbosity(), ds_logging.is_progress_bar_enabled()
    ds_logging.set_verbosity_error()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars:
            ds_logging.enable_progress_bar()


def require_text_field(ds, source: str, text_field: str) -> None:
    """Refuses a dataset without the field its text is read from, naming the fields it has."""
    if text_field not in ds.column_names:
        raise DataError(f"dataset {source!r} has no field {text_field!r} (its fields: {', '.join(ds.column_names)})")


def hf_text_sources(config: Mapping) -> list[tuple[str, str, str, str]]:
    """(config key, source, default split, text field) of every hf: text source of a resolved config."""
    found = []
    calibration = config["calibration"]
    if calibration["source"].startswith(HF_PREFIX):
        found.append(("calibration.source", calibration["source"], CALIBRATION_SPLIT, calibration["text_field"]))
    for name, source in config["evaluate"]["datasets"].items():
        if source.startswith(HF_PREFIX):
            found.append((f"evaluate.datasets.{name}", source, EVALUATION_SPLIT, EVALUATION_TEXT_FIELD))
    return found


def hf_dataset_errors(config: Mapping) -> list[str]:
    """One line per hf: text source of `config` that is not in the local cache, or lacks its text field."""
    errors = []
    for key, source, split, text_field in hf_text_sources(config):
        try:
            require_text_field(load_hf_dataset(source, split, quiet=True), source, text_field)
        except DataError as exc:
            errors.append(f"config key '{key}': {exc}")
    return errors
