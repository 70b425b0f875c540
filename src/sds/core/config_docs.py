"""Generates docs/configuration.md from config/schema.yaml: `python -m sds.core.config_docs` (a test keeps it
in sync)."""
from __future__ import annotations

import json
import sys

from .config import SCHEMA_PATH, load_schema

DOC_PATH = SCHEMA_PATH.parents[1] / "docs" / "configuration.md"


def _rows(schema: dict, prefix: str = ""):
    for key, sub in schema.get("properties", {}).items():
        name = f"{prefix}{key}"
        kind = sub.get("type", "")
        if "enum" in sub:
            kind = " \\| ".join(f"`{v}`" for v in sub["enum"])
        elif isinstance(kind, list):
            kind = " or ".join(kind)
        if kind == "array" and "enum" in sub.get("items", {}):
            kind = "list of " + " \\| ".join(f"`{v}`" for v in sub["items"]["enum"])
        default = json.dumps(sub["default"]) if "default" in sub and sub.get("type") != "object" else ""
        if sub.get("type") == "object" and "properties" in sub:
            if sub.get("description"):
                yield f"| `{name}` | section | | {sub['description']} |"
            yield from _rows(sub, name + ".")
            continue
        if sub.get("type") == "object" and isinstance(sub.get("additionalProperties"), dict):
            yield f"| `{name}` | mapping | `{json.dumps(sub.get('default', {}))}` | {sub.get('description', '')} |"
            inner = sub["additionalProperties"]
            if inner.get("type") == "object":
                yield from _rows(inner, name + ".<name>.")
            continue
        desc = sub.get("description", "")
        yield f"| `{name}` | {kind} | {f'`{default}`' if default else ''} | {desc} |"


def render() -> str:
    schema = load_schema()
    lines = ["# Configuration reference", "",
             "Generated from `config/schema.yaml` by `python -m sds.core.config_docs`; do not edit by hand.", "",
             schema.get("description", "").strip(), "",
             "| key | type | default | meaning |", "|---|---|---|---|", *_rows(schema), ""]
    return "\n".join(lines)


def main() -> int:
    DOC_PATH.parent.mkdir(exist_ok=True)
    DOC_PATH.write_text(render())
    print(f"wrote {DOC_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
