"""Configuration: validation against config/schema.yaml with messages that name the key, defaults,
semantic checks (patterns, lengths) and a stable hash of the resolved config."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import yaml

from .errors import ArchitectureError, ConfigError, TaskDataError
from .patterns import parse_pattern

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "config" / "schema.yaml"


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _key_path(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _fill_defaults(schema: dict, value):
    """Fills `default`s from the schema into `value` (in place where possible), recursively."""
    if schema.get("type") == "object" and isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = _fill_defaults(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in schema.get("properties", {}):
                    value[key] = _fill_defaults(extra, value[key])
    return value


def _describe(error) -> str:
    key = _key_path(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unexpected = sorted(set(error.instance) - set(allowed))
        where = f" in '{key}'" if error.absolute_path else ""
        return (f"unknown config key{'s' if len(unexpected) > 1 else ''} {', '.join(map(repr, unexpected))}{where}; "
                f"expected one of: {', '.join(allowed)}")
    if error.validator == "required":
        return f"config '{key}': {error.message}"
    expected = {
        "enum": lambda: f"one of {', '.join(map(repr, error.validator_value))}",
        "type": lambda: f"a value of type {error.validator_value}",
        "minimum": lambda: f"a number ≥ {error.validator_value}",
        "exclusiveMinimum": lambda: f"a number > {error.validator_value}",
        "maximum": lambda: f"a number ≤ {error.validator_value}",
        "pattern": lambda: f"a string matching {error.validator_value}",
        "minItems": lambda: f"at least {error.validator_value} item(s)",
        "minProperties": lambda: f"at least {error.validator_value} entry(ies)",
    }.get(error.validator, lambda: error.message)()
    return f"config key '{key}' = {error.instance!r} is invalid: expected {expected}"


def validate_config(raw: dict) -> dict:
    """Returns the resolved config (defaults filled) or raises ConfigError naming the offending key."""
    import jsonschema

    if not isinstance(raw, dict):
        raise ConfigError("config must be a mapping of keys to values")
    schema = load_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(raw), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise ConfigError(_describe(errors[0]))
    config = _fill_defaults(schema, copy.deepcopy(raw))
    errors = list(validator.iter_errors(config))
    if errors:
        raise ConfigError(_describe(errors[0]))
    _semantic_checks(config)
    return config


def _semantic_checks(config: dict) -> None:
    for i, text in enumerate(config["prune"]["patterns"]):
        try:
            parse_pattern(text)
        except ValueError as exc:
            raise ConfigError(f"config key 'prune.patterns.{i}': {exc}") from None
    calib_len = config["calibration"]["seqlen"]
    eval_len = config["evaluate"]["seqlen"]
    context = model_context_length(config)
    for key, value in (("calibration.seqlen", calib_len), ("evaluate.seqlen", eval_len)):
        if context is not None and value > context:
            raise ConfigError(f"config key '{key}' = {value} exceeds the model's context length {context} "
                              f"(max_position_embeddings)")
    builtin = config["model"]["builtin"]
    if config["model"]["source"] == "builtin":
        if builtin["hidden"] % builtin["heads"]:
            raise ConfigError(f"config key 'model.builtin.heads' = {builtin['heads']}: must divide "
                              f"model.builtin.hidden = {builtin['hidden']}")
        if builtin["kv_heads"] is not None and builtin["heads"] % builtin["kv_heads"]:
            raise ConfigError(f"config key 'model.builtin.kv_heads' = {builtin['kv_heads']}: must divide "
                              f"model.builtin.heads = {builtin['heads']}")
        if builtin["seqlen"] > builtin["max_positions"]:
            raise ConfigError(f"config key 'model.builtin.seqlen' = {builtin['seqlen']} exceeds "
                              f"model.builtin.max_positions = {builtin['max_positions']}")
        corpus = builtin["corpus"]
        if corpus["source"] == "text":
            for key in ("train_path", "test_path"):
                if not corpus.get(key):
                    raise ConfigError(f"config key 'model.builtin.corpus.{key}' is required when source is 'text'")
                if not Path(corpus[key]).is_file():
                    raise ConfigError(f"config key 'model.builtin.corpus.{key}': file {corpus[key]!r} not found")
    elif config["calibration"]["source"] == "builtin":
        raise ConfigError("config key 'calibration.source' = 'builtin' needs model.source 'builtin' "
                          "(an external model has no built-in corpus: give a text file or hf: dataset)")
    for name, source in config["evaluate"]["datasets"].items():
        if source == "builtin" and config["model"]["source"] != "builtin":
            raise ConfigError(f"config key 'evaluate.datasets.{name}' = 'builtin' needs model.source 'builtin'")
        if source != "builtin" and not source.startswith("hf:") and not Path(source).is_file():
            raise ConfigError(f"config key 'evaluate.datasets.{name}': file {source!r} not found")
    source = config["calibration"]["source"]
    if source != "builtin" and not source.startswith("hf:") and not Path(source).is_file():
        raise ConfigError(f"config key 'calibration.source': file {source!r} not found")
    _check_zeroshot(config["evaluate"]["zeroshot"], config["model"]["source"])


def _check_zeroshot(zs: dict, model_source: str) -> None:
    """Task names exist, an external model is not scored on the built-in model's tasks, and the data of
    the non-built-in tasks is there (files, or datasets in the local datasets cache; the built-in ones
    are made by the pipeline), so a missing file or dataset is reported before any work starts."""
    from .tasksets import BUILTIN_TASKS, check_datasets_cache, resolve_tasks, task_files

    if not zs["enabled"]:
        return
    try:
        names = resolve_tasks(zs["tasks"], zs["source"])
    except ValueError as exc:
        raise ConfigError(f"config key 'evaluate.zeroshot.tasks': {exc}") from None
    builtin = [n for n in names if n in BUILTIN_TASKS]
    if builtin and model_source != "builtin":
        raise ConfigError(f"config key 'evaluate.zeroshot.tasks' = {zs['tasks']!r}: {', '.join(builtin)} are the "
                          f"built-in model's generated tasks, meaningless for model.source {model_source!r}; name "
                          f"real tasks (e.g. sds or wanda, see docs/zeroshot.md) or set evaluate.zeroshot.enabled: false")
    external = [n for n in names if n not in BUILTIN_TASKS]
    if zs["source"] == "datasets_cache":
        try:
            check_datasets_cache(external)
        except TaskDataError as exc:
            raise ConfigError(f"config key 'evaluate.zeroshot.source' = 'datasets_cache': {exc}") from None
        return
    if external and not zs["data_dir"]:
        raise ConfigError(f"config key 'evaluate.zeroshot.data_dir' is required for the zero-shot tasks "
                          f"{', '.join(external)} (a folder with <task>/<split>.jsonl files)")
    try:
        task_files(external, zs["data_dir"], None)
    except TaskDataError as exc:
        raise ConfigError(f"config key 'evaluate.zeroshot.data_dir': {exc}") from None


def model_folder(config: dict) -> Path | None:
    """The folder of an external model (a local path, or a Hugging Face id's snapshot in the local cache);
    None for the built-in model. Raises ConfigError naming `model.source` when there is none."""
    from .architectures import resolve_model_dir

    source = config["model"]["source"]
    if source == "builtin":
        return None
    try:
        return resolve_model_dir(source)
    except ArchitectureError as exc:
        raise ConfigError(f"config key 'model.source': {exc}") from None


def model_context_length(config: dict) -> int | None:
    """The model's max positions, known without loading weights. For an external model this also checks,
    before any work, that the architecture is supported at the configured sequence lengths."""
    from .architectures import check_supported, check_tokenizer, read_model_config

    model = config["model"]
    if model["source"] == "builtin":
        return model["builtin"]["max_positions"]
    folder = model_folder(config)
    try:
        cfg = read_model_config(folder)
        check_supported(cfg, max(config["calibration"]["seqlen"], config["evaluate"]["seqlen"]), model["source"])
        check_tokenizer(folder)
    except ArchitectureError as exc:
        raise ConfigError(f"config key 'model.source': {exc}") from None
    return cfg.get("max_position_embeddings")


def defaults() -> dict:
    """The resolved config of an empty one: every default, as config/schema.yaml holds it (the only place
    defaults are written; algorithms take their settings from a config section, tests and benches from here)."""
    return validate_config({"run": "defaults"})


def second_prune_settings(config: dict, recon: str) -> dict:
    """The top-level `prune2` keys with SDS setting `recon`'s own overrides (`reconstruct.<recon>.prune2`)."""
    return {**config["prune2"], **config["reconstruct"][recon].get("prune2", {})}


def config_hash(config: dict) -> str:
    """Short stable hash of the resolved config (key order independent). `resources` (where and with how
    much memory a stage runs on a cluster) is left out: tuning it must not start a new MLflow pipeline run."""
    hashed = {k: v for k, v in config.items() if k != "resources"}
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:12]


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    return validate_config(raw)
