"""Sparsity patterns: parsing and path-safe names. Free of torch, so the Snakefile can import it cheaply."""
from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured" or "nm"
    ratio: float = 0.0  # unstructured: fraction removed
    n: int = 0  # nm: kept per group
    m: int = 0  # nm: group size

    @property
    def sparsity(self) -> float:
        return self.ratio if self.kind == "unstructured" else 1.0 - self.n / self.m

    @property
    def slug(self) -> str:
        """A path-safe name, used in output paths (`2of4`, `unstructured50`, `unstructured12p34561`): the
        percentage written out exactly, so two ratios never share an output folder."""
        if self.kind == "nm":
            return f"{self.n}of{self.m}"
        percent = format((Decimal(repr(self.ratio)) * 100).normalize(), "f")
        return f"unstructured{percent}".replace(".", "p")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else f"unstructured:{format(Decimal(repr(self.ratio)), 'f')}"


_NM = re.compile(r"^(\d+):(\d+)$")
_UNSTRUCTURED = re.compile(r"^unstructured:([0-9.]+)$")


def parse_pattern(text: str) -> Pattern:
    """Parses `N:M` or `unstructured:<ratio>`; raises ValueError saying what was expected."""
    text = str(text).strip()
    if m := _NM.match(text):
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ValueError(f"pattern {text!r}: N:M needs 0 < N < M (N weights kept per group of M)")
        return Pattern("nm", n=n, m=mm)
    if m := _UNSTRUCTURED.match(text):
        try:
            ratio = float(m.group(1))
        except ValueError:
            ratio = -1.0
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"pattern {text!r}: unstructured ratio must be in (0, 1), the fraction removed")
        return Pattern("unstructured", ratio=ratio)
    raise ValueError(f"pattern {text!r}: expected 'N:M' (e.g. 2:4) or 'unstructured:<ratio>' (e.g. unstructured:0.5)")


def pattern_from_slug(slug: str) -> Pattern:
    if m := re.fullmatch(r"(\d+)of(\d+)", slug):
        return parse_pattern(f"{m.group(1)}:{m.group(2)}")
    if m := re.fullmatch(r"unstructured([0-9]+(?:p[0-9]+)?)", slug):
        return parse_pattern(f"unstructured:{format(Decimal(m.group(1).replace('p', '.')) / 100, 'f')}")
    raise ValueError(f"not a pattern slug: {slug!r}")
