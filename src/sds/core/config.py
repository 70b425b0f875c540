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
UNHASHED_KEYS = ("resources", "results_dir")


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


def config_errors(raw, *, hf_sources: bool = False) -> tuple[dict | None, list[str]]:
    """(the resolved config or None, every error found): all schema errors, each naming its key, and all
    semantic ones (patterns, lengths, files, the model); with `hf_sources`, also every hf: dataset missing from
    the local cache (core.sources: loads each, so left to the callers that start work: the Snakefile, `sds
    validate`). The semantic checks also run on a config with schema errors, those that cannot skipped."""
    import jsonschema

    if not isinstance(raw, dict):
        return None, ["config must be a mapping of keys to values"]
    schema = load_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = _schema_errors(validator, raw)
    config = _fill_defaults(schema, copy.deepcopy(raw))
    if not errors:
        errors = _schema_errors(validator, config)
    checks = [_check_patterns, _check_sparsity_profile, _check_lengths, _check_builtin_model, _check_text_sources,
              _check_zeroshot]
    if hf_sources:
        from .sources import hf_dataset_errors

        checks.append(hf_dataset_errors)
    schema_valid = not errors
    for check in checks:
        try:
            errors += list(check(config))
        except (KeyError, TypeError, AttributeError, IndexError, ValueError):
            if schema_valid:
                raise
            # a value of the wrong type or shape, already named by its schema error: this check cannot run
    return (None if errors else config), errors


def _schema_errors(validator, value) -> list[str]:
    found = sorted(validator.iter_errors(value), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    return list(dict.fromkeys(_describe(e) for e in found))


def validate_config(raw: dict, *, hf_sources: bool = False) -> dict:
    """Returns the resolved config (defaults filled) or raises ConfigError naming every offending key
    (`errors`, and the message joining them). `hf_sources`: see config_errors."""
    config, errors = config_errors(raw, hf_sources=hf_sources)
    if errors:
        raise ConfigError(errors[0] if len(errors) == 1 else f"{len(errors)} errors: " + "; ".join(errors), errors)
    return config


def _check_patterns(config: dict):
    for i, text in enumerate(config["prune"]["patterns"]):
        try:
            parse_pattern(text)
        except ValueError as exc:
            yield f"config key 'prune.patterns.{i}': {exc}"


def _check_sparsity_profile(config: dict):
    """OWL spreads an unstructured ratio over the layers: an N:M pattern fixes every layer's sparsity, and
    each layer's ratio ± owl_lambda must stay a sparsity."""
    prune = config["prune"]
    if prune["sparsity_profile"] != "owl":
        return
    for i, text in enumerate(prune["patterns"]):
        try:
            pattern = parse_pattern(text)
        except ValueError:
            continue  # named by _check_patterns
        if pattern.kind == "nm":
            yield (f"config key 'prune.patterns.{i}': {text!r} is an N:M pattern, but prune.sparsity_profile 'owl' "
                   "gives each decoder layer its own unstructured ratio; use unstructured patterns with owl, or "
                   "sparsity_profile 'uniform' for N:M")
        elif not (pattern.ratio - prune["owl_lambda"] >= 0 and pattern.ratio + prune["owl_lambda"] < 1):
            yield (f"config key 'prune.owl_lambda' = {prune['owl_lambda']} takes pattern {text!r}'s layers outside "
                   "sparsities [0, 1): it must be at most the ratio and below 1 − the ratio")


def _check_lengths(config: dict):
    try:
        context = model_context_length(config)
    except ConfigError as exc:
        yield str(exc)
        return
    for key in ("calibration.seqlen", "evaluate.seqlen"):
        section, name = key.split(".")
        value = config[section][name]
        if context is not None and value > context:
            yield f"config key '{key}' = {value} exceeds the model's context length {context} (max_position_embeddings)"


def _check_builtin_model(config: dict):
    if config["model"]["source"] != "builtin":
        return
    builtin = config["model"]["builtin"]
    if builtin["hidden"] % builtin["heads"]:
        yield (f"config key 'model.builtin.heads' = {builtin['heads']}: must divide "
               f"model.builtin.hidden = {builtin['hidden']}")
    if builtin["kv_heads"] is not None and builtin["heads"] % builtin["kv_heads"]:
        yield (f"config key 'model.builtin.kv_heads' = {builtin['kv_heads']}: must divide "
               f"model.builtin.heads = {builtin['heads']}")
    if builtin["seqlen"] > builtin["max_positions"]:
        yield (f"config key 'model.builtin.seqlen' = {builtin['seqlen']} exceeds "
               f"model.builtin.max_positions = {builtin['max_positions']}")
    corpus = builtin["corpus"]
    if corpus["source"] == "text":
        for key in ("train_path", "test_path"):
            if not corpus.get(key):
                yield f"config key 'model.builtin.corpus.{key}' is required when source is 'text'"
            elif not Path(corpus[key]).is_file():
                yield f"config key 'model.builtin.corpus.{key}': file {corpus[key]!r} not found"


def _check_text_sources(config: dict):
    """'builtin' only with the built-in model; a local text file must be there (hf: ones: core.sources)."""
    builtin_model = config["model"]["source"] == "builtin"
    named = [("calibration.source", config["calibration"]["source"])]
    named += [(f"evaluate.datasets.{name}", source) for name, source in config["evaluate"]["datasets"].items()]
    for key, source in named:
        if source == "builtin" and not builtin_model:
            yield (f"config key '{key}' = 'builtin' needs model.source 'builtin' (an external model has no "
                   "built-in corpus: give a text file or hf: dataset)")
        elif source != "builtin" and not source.startswith("hf:") and not Path(source).is_file():
            yield f"config key '{key}': file {source!r} not found"


def _check_zeroshot(config: dict):
    """Task names exist, an external model is not scored on the built-in model's tasks, and the data of the
    non-built-in tasks is there (files, or datasets in the local datasets cache; the built-in ones are made
    by the pipeline), so a missing file or dataset is reported before any work starts."""
    from .tasksets import BUILTIN_TASKS, check_datasets_cache, resolve_tasks, task_files

    zs = config["evaluate"]["zeroshot"]
    if not zs["enabled"]:
        return
    try:
        names = resolve_tasks(zs["tasks"], zs["source"])
    except ValueError as exc:
        yield f"config key 'evaluate.zeroshot.tasks': {exc}"
        return
    model_source = config["model"]["source"]
    builtin = [n for n in names if n in BUILTIN_TASKS]
    if builtin and model_source != "builtin":
        yield (f"config key 'evaluate.zeroshot.tasks' = {zs['tasks']!r}: {', '.join(builtin)} are the "
               f"built-in model's generated tasks, meaningless for model.source {model_source!r}; name "
               f"real tasks (e.g. sds or wanda, see docs/zeroshot.md) or set evaluate.zeroshot.enabled: false")
    external = [n for n in names if n not in BUILTIN_TASKS]
    if zs["source"] == "datasets_cache":
        try:
            check_datasets_cache(external)
        except TaskDataError as exc:
            yield f"config key 'evaluate.zeroshot.source' = 'datasets_cache': {exc}"
        return
    if external and not zs["data_dir"]:
        yield (f"config key 'evaluate.zeroshot.data_dir' is required for the zero-shot tasks "
               f"{', '.join(external)} (a folder with <task>/<split>.jsonl files)")
        return
    try:
        task_files(external, zs["data_dir"], None)
    except TaskDataError as exc:
        yield f"config key 'evaluate.zeroshot.data_dir': {exc}"


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
    much memory a stage runs on a cluster) and `results_dir` (where its outputs go) are left out: neither
    changes a number, and changing one must not start a new MLflow pipeline run."""
    hashed = {k: v for k, v in config.items() if k not in UNHASHED_KEYS}
    return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:12]


def read_config_file(path: str | Path) -> dict:
    """A YAML (or JSON) config file as written, not validated; ConfigError naming the file if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None


def load_config_file(path: str | Path, *, hf_sources: bool = False) -> dict:
    return validate_config(read_config_file(path), hf_sources=hf_sources)
