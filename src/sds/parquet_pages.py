"""Direct reads of the activation caches' Parquet pages, for the layout ParquetTensorWriter writes:
one BYTE_ARRAY column, PLAIN encoding, no compression, no dictionary.

Why: Arrow decodes such a column by copying every value into a new buffer (~5 GB/s here), after the
file's bytes were already copied once out of the page cache, so a warm read ran at ~0.3 of a plain
file read. Here each value is read with one `readinto` straight into the tensor that holds it, and
only the few bytes of each page header are parsed. Anything else (compression, dictionary pages, an
unknown page type) is reported by raising `Unsupported`, and the caller reads through Arrow.

Page headers are Thrift compact-protocol structs (parquet.thrift: PageHeader, DataPageHeader,
DataPageHeaderV2); `_read_struct` is a minimal decoder of that protocol.
"""
from __future__ import annotations

import numpy as np


class Unsupported(ValueError):
    """The file is not in the layout this reader handles; read it through Arrow instead."""


# Thrift compact protocol type ids
_STOP, _TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(13)

# parquet.thrift PageType and the PageHeader / data page header field ids used here
_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _read_value(buf, pos: int, kind: int):
    if kind in (_TRUE, _FALSE):
        return kind == _TRUE, pos
    if kind == _BYTE:
        return buf[pos], pos + 1
    if kind in (_I16, _I32, _I64):
        n, pos = _varint(buf, pos)
        return _zigzag(n), pos
    if kind == _DOUBLE:
        return None, pos + 8
    if kind == _BINARY:
        n, pos = _varint(buf, pos)
        return bytes(buf[pos:pos + n]), pos + n
    if kind in (_LIST, _SET):
        head = buf[pos]
        pos += 1
        size, elem = head >> 4, head & 0x0F
        if size == 15:
            size, pos = _varint(buf, pos)
        items = []
        for _ in range(size):
            if elem in (_TRUE, _FALSE):  # list booleans are one byte each
                items.append(buf[pos] == 1)
                pos += 1
            else:
                item, pos = _read_value(buf, pos, elem)
                items.append(item)
        return items, pos
    if kind == _MAP:
        size, pos = _varint(buf, pos)
        if size == 0:
            return {}, pos
        types = buf[pos]
        pos += 1
        out = {}
        for _ in range(size):
            key, pos = _read_value(buf, pos, types >> 4)
            out[key], pos = _read_value(buf, pos, types & 0x0F)
        return out, pos
    if kind == _STRUCT:
        return _read_struct(buf, pos)
    raise Unsupported(f"thrift type {kind} in a page header")


def _read_struct(buf, pos: int) -> tuple[dict[int, object], int]:
    """One compact-protocol struct at `pos` → ({field id: value}, position after it)."""
    fields, last = {}, 0
    while True:
        head = buf[pos]
        pos += 1
        kind = head & 0x0F
        if kind == _STOP:
            return fields, pos
        delta = head >> 4
        if delta:
            field = last + delta
        else:
            n, pos = _varint(buf, pos)
            field = _zigzag(n)
        fields[field], pos = _read_value(buf, pos, kind)
        last = field


def check_layout(parquet_file) -> None:
    """Raises Unsupported unless every row group's column is uncompressed PLAIN without a dictionary."""
    column = parquet_file.schema.column(0)
    if column.physical_type != "BYTE_ARRAY" or column.max_repetition_level != 0:
        raise Unsupported("not a flat byte-array column")
    meta = parquet_file.metadata
    for g in range(meta.num_row_groups):
        chunk = meta.row_group(g).column(0)
        if chunk.compression != "UNCOMPRESSED" or chunk.has_dictionary_page or "PLAIN" not in chunk.encodings:
            raise Unsupported(f"row group {g}: {chunk.compression}, encodings {chunk.encodings}")


class SequentialReader:
    """Reads a file front to back and hands every byte, in order and exactly once, to `consume` (the
    checksum), including the bytes it skips. `readinto` reads straight into the caller's buffer."""

    def __init__(self, path, consume=None):
        self._fh = open(path, "rb", buffering=0)
        self._consume = consume
        self._ahead = b""  # bytes read from the file but not yet consumed (page headers are peeked)
        self.pos = 0

    def _take(self, data) -> None:
        if self._consume is not None and len(data):
            self._consume(data)

    def peek(self, n: int) -> bytes:
        if len(self._ahead) < n:
            self._ahead += self._fh.read(n - len(self._ahead))
        return self._ahead[:n]

    def read(self, n: int) -> bytes:
        data = self.peek(n)
        if len(data) != n:
            raise ValueError(f"file ends at {self.pos + len(data)}, inside a {n}-byte read at {self.pos}")
        self._ahead = self._ahead[n:]
        self._take(data)
        self.pos += n
        return data

    def readinto(self, buf: np.ndarray) -> None:
        view = memoryview(buf).cast("B")
        head = min(len(self._ahead), len(view))
        view[:head] = self._ahead[:head]
        self._ahead = self._ahead[head:]
        done = head
        while done < len(view):
            n = self._fh.readinto(view[done:])
            if not n:
                raise ValueError(f"file ends at {self.pos + done}, inside a {len(view)}-byte value")
            done += n
        self._take(buf)
        self.pos += len(view)

    def skip_to(self, pos: int) -> None:
        if pos < self.pos:
            raise Unsupported(f"column chunk at {pos} lies before the read position {self.pos}")
        while self.pos < pos:
            self.read(min(pos - self.pos, 8 << 20))

    def read_rest(self) -> None:
        """Consumes the rest of the file (the footer), so the checksum covers every byte."""
        while self.read_some(8 << 20):
            pass

    def read_some(self, n: int) -> int:
        data = self._ahead[:n] if self._ahead else self._fh.read(n)
        self._ahead = self._ahead[len(data):]
        self._take(data)
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        self._fh.close()


def chunk_range(parquet_file, group: int) -> tuple[int, int]:
    """(file offset, byte size) of row group `group`'s column chunk."""
    chunk = parquet_file.metadata.row_group(group).column(0)
    return chunk.data_page_offset, chunk.total_compressed_size


_MAX_PAGE_HEADER = 4096  # page headers without statistics are ~20 bytes; the peek only has to cover one


def value_lengths(reader: SequentialReader, end: int, has_def_levels: bool, expected_rows: int):
    """Walks one column chunk (from `reader.pos` to `end`), yielding each value's byte length with the
    reader positioned at the value's first byte; the caller must read exactly that many bytes."""
    rows = 0
    while reader.pos < end:
        head = reader.peek(_MAX_PAGE_HEADER)
        header, size = _read_struct(head, 0)
        reader.read(size)
        page_type, page_size = header.get(1), header.get(3)
        page_end = reader.pos + (page_size or 0)
        if page_size is None or page_end > end:
            raise ValueError(f"page at {reader.pos} runs past its column chunk")
        if page_type == _DATA_PAGE:
            data_header = header[5]
            if data_header.get(2, 0) != 0:  # Encoding.PLAIN
                raise Unsupported(f"data page encoding {data_header.get(2)}")
            if has_def_levels:  # v1: the levels come first, prefixed by their 4-byte length
                reader.read(int.from_bytes(reader.read(4), "little"))
        elif page_type == _DATA_PAGE_V2:
            data_header = header[8]
            if data_header.get(2, 0):
                raise ValueError("null values in an activation cache")
            if data_header.get(4, 0) != 0:
                raise Unsupported(f"data page encoding {data_header.get(4)}")
            reader.read(data_header.get(5, 0) + data_header.get(6, 0))
        else:
            raise Unsupported(f"page type {page_type}")
        for _ in range(data_header[1]):
            yield int.from_bytes(reader.read(4), "little")
            rows += 1
        if reader.pos != page_end:
            raise ValueError(f"page values end at {reader.pos}, the page at {page_end}")
    if rows != expected_rows:
        raise ValueError(f"{rows} values in a row group of {expected_rows} rows")
