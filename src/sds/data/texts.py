"""Text sources (built-in corpus, local files, `datasets` cache) and tokenisation."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core import sources
from ..core.errors import DataError



def read_text_source(source: str, *, text_field: str = "text", builtin_text: str | Path | None = None,
                     split: str = "train") -> str:
    """The text of a source: 'builtin' (a file the corpus stage wrote, read as it is), a .txt/.jsonl/.parquet
    path, or 'hf:<dataset>[:<config>[:<split>]]' read from the local `datasets` cache (offline: see
    core.sources). Records are joined with blank lines, the SparseGPT/Wanda `"\n\n".join(data["text"])`;
    a .txt file's records are its lines as the `datasets` WikiText loader yields them (see `join_lines`), so
    a local wiki.test.raw gives the same text as hf:wikitext:wikitext-2-raw-v1:test."""
    if source == "builtin":
        if builtin_text is None:
            raise DataError("text source 'builtin' needs the built-in corpus")
        return _read_file(Path(builtin_text), text_field, as_lines=False)
    if source.startswith("hf:"):
        return _read_datasets(source, text_field, split)
    return _read_file(Path(source), text_field)


def join_lines(text: str) -> str:
    """A text file as WikiText's `datasets` rows — one per line, newline kept, whitespace-only lines
    empty — joined with "\n\n"."""
    lines = text.split("\n")
    rows = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    return "\n\n".join(row if row.strip() else "" for row in rows)


def _read_file(path: Path, text_field: str, as_lines: bool = True) -> str:
    if not path.is_file():
        raise DataError(f"text file {str(path)!r} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(str(path), columns=[text_field])
            values = table.column(text_field).to_pylist()
            return "\n\n".join(_text_value(v, path, text_field, f"row {i}") for i, v in enumerate(values))
        if suffix in (".jsonl", ".json"):
            lines = enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            records = [(n, json.loads(line)) for n, line in lines if line.strip()]
            return "\n\n".join(_text_value(r[text_field], path, text_field, f"line {n}") for n, r in records)
        text = path.read_text(encoding="utf-8")
        return join_lines(text) if as_lines else text
    except (KeyError, json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"cannot read text from {str(path)!r} (field {text_field!r}): {exc}") from None
    except Exception as exc:  # pyarrow errors
        raise DataError(f"cannot read text from {str(path)!r} (field {text_field!r}): {exc}") from None


def _text_value(value, path: Path | str, text_field: str, where: str) -> str:
    """A record's text; a null or non-text value is refused, naming the file and the record (calibrating on
    "None" would go unnoticed)."""
    if not isinstance(value, str):
        shown = "null" if value is None else repr(value)[:60]
        raise DataError(f"text source {str(path)!r}, {where}: field {text_field!r} is {shown}, not text")
    return value


def _read_datasets(source: str, text_field: str, default_split: str) -> str:
    ds = sources.load_hf_dataset(source, default_split)
    sources.require_text_field(ds, source, text_field)
    return "\n\n".join(_text_value(x, source, text_field, f"record {i}") for i, x in enumerate(ds[text_field]))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, tokenised once, no special tokens added (1-D long tensor)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)
