import pytest
import torch

from sds.core.errors import CorruptFileError
from sds.storage.parquet import ParquetTensorWriter, iter_parquet_tensors
from sds.storage.atomic import atomic_dir, atomic_path
from sds.storage.safetensors import load_tensors, save_tensors
from sds.storage.documents import write_json


def test_safetensors_round_trip_is_exact(tmp_path):
    tensors = {"a.weight": torch.randn(4, 8), "mask": torch.rand(4, 8) > 0.5, "h": torch.randn(3).half()}
    save_tensors(tmp_path / "w.safetensors", tensors)
    back = load_tensors(tmp_path / "w.safetensors")
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype
        assert torch.equal(back[k], tensors[k])


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_checkpoint_is_named(tmp_path, damage):
    path = tmp_path / "w.safetensors"
    save_tensors(path, {"x": torch.randn(64, 64)})
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="w.safetensors.*checksum mismatch.*re-run snakemake"):
        load_tensors(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CorruptFileError, match="nothere.safetensors: file is missing"):
        load_tensors(tmp_path / "nothere.safetensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_parquet_stream_round_trip(tmp_path, dtype):
    rows = [torch.randn(5, 6) for _ in range(7)]
    with ParquetTensorWriter(tmp_path / "c.parquet", dtype=dtype, row_group_size=3) as w:
        for r in rows:
            w.append(r)
    back = list(iter_parquet_tensors(tmp_path / "c.parquet"))
    assert len(back) == 7
    for a, b in zip(rows, back):
        assert torch.equal(a.to(dtype), b)


def test_parquet_corruption_detected(tmp_path):
    with ParquetTensorWriter(tmp_path / "c.parquet", dtype=torch.float16, row_group_size=2) as w:
        for _ in range(4):
            w.append(torch.randn(3, 3))
    p = tmp_path / "c.parquet"
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(CorruptFileError, match="c.parquet"):
        list(iter_parquet_tensors(p))


def test_parquet_altered_byte_is_detected_before_the_stream_ends(tmp_path):
    """A flipped byte inside a tensor parses fine; the checksum must still fail the read."""
    rows = [torch.randn(64, 64) for _ in range(4)]
    p = tmp_path / "c.parquet"
    with ParquetTensorWriter(p, dtype=torch.float32, row_group_size=2) as w:
        for r in rows:
            w.append(r)
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x55
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="c.parquet: checksum mismatch"):
        for _ in iter_parquet_tensors(p):
            pass


def test_failed_writes_leave_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "dir") as tmp:
            (tmp / "f").write_text("partial")
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with ParquetTensorWriter(tmp_path / "c.parquet", dtype=torch.float16, row_group_size=1) as w:
            w.append(torch.randn(2, 2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    write_json(tmp_path / "ok.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["ok.json"]


def test_outputs_get_the_modes_of_plainly_created_files(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            write_json(tmp / "a.json", {})
        save_tensors(tmp_path / "w.safetensors", {"x": torch.zeros(1)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    for f in (tmp_path / "d" / "a.json", tmp_path / "w.safetensors", tmp_path / "w.safetensors.xxh3"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f


def test_saved_model_folder_is_verified_on_load(tmp_path):
    from conftest import tiny_opt
    from sds.storage.checksums import checksum_folder
    from sds.model.loading import load_model

    model = tiny_opt()
    model.save_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(tmp_path)
    checksum_folder(tmp_path)
    load_model(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="model.safetensors: checksum mismatch"):
        load_model(tmp_path)


def test_streamed_safetensors_equal_a_whole_file_save(tmp_path):
    from safetensors.torch import load_file

    from sds.storage.safetensors import SafetensorsStreamWriter, TensorReader

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.uint8), "c": torch.randn(2, 2).bfloat16()}
    with SafetensorsStreamWriter(tmp_path / "s.safetensors", {k: (v.dtype, v.shape) for k, v in tensors.items()},
                                 metadata={"note": "x"}) as writer:
        for k, v in tensors.items():
            writer.write(k, v)
    loaded = load_file(tmp_path / "s.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    reader = TensorReader(tmp_path / "s.safetensors")  # the checksum sidecar was written
    assert reader.spec("c") == (torch.bfloat16, (2, 2)) and torch.equal(reader["a"], tensors["a"])
    with pytest.raises(CorruptFileError, match="has no tensor 'z'"):
        reader["z"]


def test_streamed_safetensors_refuse_wrong_order_shape_and_incomplete_files(tmp_path):
    from sds.storage.safetensors import SafetensorsStreamWriter

    specs = {"a": (torch.float32, (2,)), "b": (torch.float32, (3,))}
    writer = SafetensorsStreamWriter(tmp_path / "s.safetensors", specs)
    with pytest.raises(ValueError, match="expected tensor 'a' next, got 'b'"):
        writer.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match=r"declared torch.float32 \(2,\)"):
        writer.write("a", torch.zeros(4))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="closed after 1 of 2 tensors"):
        writer.close()
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary is left


def test_plain_safetensors_reader_matches_the_library_and_names_bad_files(tmp_path):
    from safetensors.torch import save_file

    from sds.storage.safetensors import SafetensorsFile

    tensors = {"w": torch.randn(4, 6), "m": torch.ones(3, dtype=torch.bool), "h": torch.randn(5).half()}
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"k": "v"})
    reader = SafetensorsFile(tmp_path / "lib.safetensors")
    assert sorted(reader.keys()) == sorted(tensors) and reader.metadata() == {"k": "v"}
    assert all(torch.equal(reader[k], v) for k, v in tensors.items())
    (tmp_path / "bad.safetensors").write_bytes((10 ** 9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CorruptFileError, match="bad.safetensors: not a readable safetensors file"):
        SafetensorsFile(tmp_path / "bad.safetensors")


def _cache_with_pyarrow(path, rows, column_type="fixed", nullable=True, **options):
    """A cache file in ParquetTensorWriter's schema, written by pyarrow directly with other writer options."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from sds.storage.checksums import write_checksum

    values = [r.numpy().tobytes() for r in rows]
    typ = {"fixed": pa.binary(len(values[0])), "large_binary": pa.large_binary(), "binary": pa.binary()}[column_type]
    meta = {b"sds.shape": json.dumps(list(rows[0].shape)).encode(), b"sds.dtype": b"torch.float32"}
    schema = pa.schema([pa.field("hidden", typ, nullable=nullable)], metadata=meta)
    pq.write_table(pa.table({"hidden": pa.array(values, type=typ)}, schema=schema), str(path), **options)
    write_checksum(path)


@pytest.mark.parametrize("column_type, nullable, options", [
    ("fixed", True, {"compression": "none", "row_group_size": 3}),
    ("fixed", True, {"compression": "none", "row_group_size": 3, "write_statistics": True}),  # large min/max
    ("fixed", True, {"compression": "none", "row_group_size": 4, "use_dictionary": True}),
    ("fixed", False, {"compression": "none", "row_group_size": 3}),  # non-nullable: no definition levels
    ("fixed", True, {"compression": "none", "row_group_size": 2, "data_page_size": 64}),  # a page per value
    ("fixed", True, {"compression": "none", "row_group_size": 3, "data_page_version": "2.0"}),
    ("fixed", True, {"compression": "zstd", "row_group_size": 3}),
    ("fixed", True, {"compression": "none", "row_group_size": 3, "column_encoding": {"hidden": "BYTE_STREAM_SPLIT"},
                     "use_dictionary": False}),
    ("large_binary", True, {"compression": "none", "row_group_size": 3}),  # caches of earlier versions
    ("binary", True, {"compression": "snappy", "row_group_size": 3, "write_statistics": True}),
])
def test_caches_written_with_any_writer_settings_read_back_exactly(tmp_path, column_type, nullable, options):
    """Arrow reads whatever a Parquet writer chose (encodings, statistics, page sizes, compression): a good
    cache is never reported corrupt because of its layout."""
    rows = [torch.randn(6, 5) for _ in range(7)]
    _cache_with_pyarrow(tmp_path / "c.parquet", rows, column_type, nullable, **options)
    back = list(iter_parquet_tensors(tmp_path / "c.parquet"))
    assert len(back) == 7 and all(torch.equal(a, b) for a, b in zip(rows, back))


def test_cached_tensors_view_arrows_buffer_without_copies(tmp_path):
    """Each row group is decoded once into one buffer, and its tensors are views of it, back to back."""
    rows = [torch.randn(4, 8) for _ in range(6)]
    with ParquetTensorWriter(tmp_path / "c.parquet", dtype=torch.float32, row_group_size=3) as w:
        for r in rows:
            w.append(r)
    back = list(iter_parquet_tensors(tmp_path / "c.parquet"))
    nbytes = 4 * 8 * 4
    for group in (back[:3], back[3:]):
        starts = [t.data_ptr() for t in group]
        assert [b - a for a, b in zip(starts, starts[1:])] == [nbytes, nbytes]
        assert all(t.untyped_storage().data_ptr() == group[0].untyped_storage().data_ptr() for t in group)
    assert all(torch.equal(a, b) for a, b in zip(rows, back))


def test_cache_of_wrong_value_size_or_type_is_named(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from sds.storage.checksums import write_checksum

    p = tmp_path / "c.parquet"
    meta = {b"sds.shape": json.dumps([4, 4]).encode(), b"sds.dtype": b"torch.float32"}
    pq.write_table(pa.table({"hidden": pa.array([b"x" * 60], type=pa.binary(60))}).replace_schema_metadata(meta), p)
    write_checksum(p)
    with pytest.raises(CorruptFileError, match=r"c.parquet: row group 0 unreadable \(60-byte values where"):
        list(iter_parquet_tensors(p))
    pq.write_table(pa.table({"hidden": pa.array([1.0])}).replace_schema_metadata(meta), p)
    write_checksum(p)
    with pytest.raises(CorruptFileError, match="c.parquet: row group 0 unreadable .*expected binary values"):
        list(iter_parquet_tensors(p))


def test_damaged_cache_is_named_with_and_without_a_checksum(tmp_path):
    rows = [torch.randn(8, 8) for _ in range(4)]
    p = tmp_path / "c.parquet"
    with ParquetTensorWriter(p, dtype=torch.float32, row_group_size=2) as w:
        for r in rows:
            w.append(r)
    data = bytearray(p.read_bytes())
    data[4:12] = b"\xff" * 8  # the first page header
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="c.parquet: row group 0 unreadable"):
        list(iter_parquet_tensors(p, verify=False))
    with pytest.raises(CorruptFileError, match="c.parquet: checksum mismatch"):
        list(iter_parquet_tensors(p))
    p.write_bytes(b"not parquet at all")
    with pytest.raises(CorruptFileError, match="c.parquet: not a readable activation cache"):
        list(iter_parquet_tensors(p, verify=False))


# --- ownership records: what the pipeline may delete --------------------------------------------------------

def test_only_outputs_this_run_recorded_are_discarded(tmp_path, monkeypatch):
    """A corrupt file is discarded with the whole output holding it only when that output's record names
    its own place inside the run's folder; names of folders play no part."""
    import os
    import shutil

    from sds.storage.records import OUTPUT_RECORD, discard_stage_output, recorded_output

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "results" / "exp1"
    with atomic_dir(run / "activations" / "dense") as tmp:
        save_tensors(tmp / "layer_000.safetensors", {"x": torch.zeros(2)})
    with atomic_path(run / "calibration.parquet", checksum=True, record=True) as tmp:
        tmp.write_bytes(b"ids")
    # a user's checkpoint folder named like an output, inside the run's folder: no record
    user = run / "model"
    user.mkdir()
    (user / "model.safetensors").write_bytes(b"truncated")
    # a copy of an output (its record names the original) and another run's output
    shutil.copytree(run / "activations" / "dense", run / "backup" / "dense")
    with atomic_dir(tmp_path / "results" / "other" / "sds") as tmp:
        (tmp / "w.safetensors").write_bytes(b"w")
    # a user's folder linked into the run's folder
    elsewhere = tmp_path / "mine"
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_bytes(b"w")
    os.symlink(elsewhere, run / "linked")

    for foreign in (user / "model.safetensors", run / "backup" / "dense" / "layer_000.safetensors",
                    tmp_path / "results" / "other" / "sds" / "w.safetensors", run / "linked" / "model.safetensors",
                    run / "nothing-here.parquet"):
        assert recorded_output(foreign, run) is None, foreign
        assert discard_stage_output(foreign, run) is None
    assert (user / "model.safetensors").read_bytes() == b"truncated"
    assert (run / "backup" / "dense" / OUTPUT_RECORD).is_file() and (elsewhere / "model.safetensors").is_file()
    assert (tmp_path / "results" / "other" / "sds" / "w.safetensors").is_file()

    layer = run / "activations" / "dense" / "layer_000.safetensors"
    assert discard_stage_output(layer, run) == (run / "activations" / "dense").resolve()
    assert not (run / "activations" / "dense").exists() and (run / "activations").is_dir()
    assert discard_stage_output(run / "calibration.parquet", run) == (run / "calibration.parquet").resolve()
    assert sorted(p.name for p in run.iterdir()) == ["activations", "backup", "linked", "model"]


def test_records_survive_moving_the_whole_project(tmp_path, monkeypatch):
    from sds.storage.records import recorded_output

    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    with atomic_dir("results/r/prune1") as tmp:
        (tmp / "weights.safetensors").write_bytes(b"w")
    (tmp_path / "a").rename(tmp_path / "b")
    monkeypatch.chdir(tmp_path / "b")
    assert recorded_output("results/r/prune1/weights.safetensors", "results/r") == (tmp_path / "b/results/r/prune1")


def test_atomic_dir_replaces_only_its_own_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with atomic_dir("out") as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir("out") as tmp:  # its own earlier output: replaced
        (tmp / "a").write_text("2")
    assert (tmp_path / "out" / "a").read_text() == "2"
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "keep").write_text("mine")
    ran = []
    with pytest.raises(FileExistsError, match="not an output this pipeline wrote there .*: .user."):
        with atomic_dir("user"):
            ran.append(1)
    assert not ran, "refused before any work"
    assert (tmp_path / "user" / "keep").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "user"]


# --- failed writes: the output file is named, nothing is left ---------------------------------------------

_WRITE_UNDER_LIMIT = """
import resource, sys, torch
sys.path.insert(0, {src!r})
from sds.storage.atomic import atomic_dir
from sds.storage.parquet import ParquetTensorWriter
from sds.storage.safetensors import SafetensorsStreamWriter, save_tensors
out = {out!r}
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
kind = sys.argv[1]
try:
    if kind == "parquet":
        with ParquetTensorWriter(out + "/c.parquet", dtype=torch.float32, row_group_size=2) as w:
            for _ in range(8):
                w.append(torch.randn(64, 64))
    elif kind == "stream":
        with SafetensorsStreamWriter(out + "/s.safetensors", {{"a": (torch.float32, (128, 256))}}) as w:
            w.write("a", torch.randn(128, 256))
    elif kind == "dir":
        with atomic_dir(out + "/stage") as tmp:
            save_tensors(tmp / "w.safetensors", {{"a": torch.randn(128, 256)}})
except OSError as exc:
    print(exc.errno, exc.filename)
"""


@pytest.mark.parametrize("kind, named", [("parquet", "c.parquet"), ("stream", "s.safetensors"),
                                         ("dir", "stage/w.safetensors")])
def test_write_over_the_file_size_limit_names_the_output_and_leaves_nothing(tmp_path, kind, named):
    import errno
    import subprocess
    import sys

    from conftest import ROOT

    script = _WRITE_UNDER_LIMIT.format(src=str(ROOT / "src"), out=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script, kind], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    code, filename = proc.stdout.split()
    assert int(code) == errno.EFBIG and filename == str(tmp_path / named)
    assert list(tmp_path.iterdir()) == [], "the temporary was removed"


@pytest.mark.parametrize("memory_bytes", [0, 3 * 4 * 5 * 8, 1 << 20])  # always disk, spills mid-stream, all held
def test_work_stream_gives_the_same_batches_held_spilled_or_on_disk(tmp_path, memory_bytes):
    from sds.core.layout import layer_file as cache_file
    from sds.model.streams import WorkStream, append_batch

    torch.manual_seed(0)
    first = cache_file(tmp_path / "inputs", 0)
    first.parent.mkdir()
    batches = [torch.randn(2, 5, 8, dtype=torch.bfloat16) for _ in range(3)] + [torch.randn(1, 5, 8, dtype=torch.bfloat16)]
    with ParquetTensorWriter(first, dtype=torch.bfloat16, row_group_size=2) as writer:
        for b in batches:
            append_batch(writer, b)
    stream = WorkStream(tmp_path / "work", first, dtype=torch.bfloat16, device="cpu", batch_size=2,
                        row_group_size=2, memory_bytes=memory_bytes)
    expected = batches
    for layer in range(1, 4):  # each "layer" doubles its input; read twice as a pass does (statistics, propagate)
        assert [b.shape[0] for b in stream] == [b.shape[0] for b in expected]
        for got, want in zip(stream, expected):
            assert torch.equal(got, want)
        stream.advance((b * 2 for b in stream), layer)
        expected = [b * 2 for b in expected]
        on_disk = sorted(p.name for p in (tmp_path / "work").glob("*.parquet"))
        assert on_disk == ([] if memory_bytes == 1 << 20 else [f"stream_{layer:03d}.parquet"])
    assert torch.equal(torch.cat(list(stream)), torch.cat(expected))
    stream.close()
    assert not (tmp_path / "work").exists() and first.exists()


def test_one_save_in_flight_raises_a_failed_write_at_the_next_save_or_when_the_block_ends():
    """The sequential passes save each layer's statistics in the background; a failed write must stop the
    stage (a layer later at most), never pass silently."""
    from sds.model.passes import OneSaveInFlight

    written = []

    def full_disk(*_):
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        with OneSaveInFlight() as saves:
            saves.submit(full_disk)
            saves.submit(written.append, "layer 1")  # the failure surfaces here, before the next write
    assert written == []
    with pytest.raises(OSError, match="No space left"):
        with OneSaveInFlight() as saves:
            saves.submit(written.append, "layer 0")
            saves.submit(full_disk)  # the last write: its failure surfaces when the block ends
    assert written == ["layer 0"]
