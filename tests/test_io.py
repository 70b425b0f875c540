import pytest
import torch

from sds.io import (CorruptFileError, ParquetTensorWriter, atomic_dir, atomic_path, iter_parquet_tensors,
                    load_tensors, save_tensors, write_json)


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


def test_saved_model_folder_is_verified_on_load(tmp_path):
    from conftest import tiny_opt
    from sds.io import checksum_folder
    from sds.model import load_model

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


def test_stage_output_root_picks_the_whole_stage_output(tmp_path):
    from sds.io import stage_output_root

    r = tmp_path / "results" / "run"
    assert stage_output_root(r / "w/2of4/d/sds/model/model.safetensors") == (r / "w/2of4/d/sds").resolve()
    assert stage_output_root(r / "activations/dense/layer_000.parquet") == (r / "activations/dense").resolve()
    assert stage_output_root(r / "w/2of4/prune1/stream/layer_001.parquet") == (r / "w/2of4/prune1").resolve()
    assert stage_output_root(tmp_path / "results" / "model") is None  # a run named 'model' is not an output
    assert stage_output_root(tmp_path / "my-model" / "model.safetensors") is None  # user files are never removed


def test_streamed_safetensors_equal_a_whole_file_save(tmp_path):
    from safetensors.torch import load_file

    from sds.io import SafetensorsStreamWriter, TensorReader

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
    from sds.io import SafetensorsStreamWriter

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

    from sds.io import SafetensorsFile

    tensors = {"w": torch.randn(4, 6), "m": torch.ones(3, dtype=torch.bool), "h": torch.randn(5).half()}
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"k": "v"})
    reader = SafetensorsFile(tmp_path / "lib.safetensors")
    assert sorted(reader.keys()) == sorted(tensors) and reader.metadata() == {"k": "v"}
    assert all(torch.equal(reader[k], v) for k, v in tensors.items())
    (tmp_path / "bad.safetensors").write_bytes((10 ** 9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CorruptFileError, match="bad.safetensors: not a readable safetensors file"):
        SafetensorsFile(tmp_path / "bad.safetensors")


def _cache_with_pyarrow(path, rows, **options):
    """A cache file in ParquetTensorWriter's schema, written by pyarrow directly with other writer options."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"hidden": pa.array([r.numpy().tobytes() for r in rows], type=pa.large_binary())})
    table = table.replace_schema_metadata({b"sds.shape": json.dumps(list(rows[0].shape)).encode(),
                                           b"sds.dtype": b"torch.float32"})
    pq.write_table(table, str(path), use_dictionary=False, write_statistics=False, **options)
    from sds.io import _write_checksum

    _write_checksum(path)


@pytest.mark.parametrize("options, through_arrow", [
    ({"compression": "none", "row_group_size": 3}, False),
    ({"compression": "none", "row_group_size": 3, "data_page_version": "2.0"}, False),
    ({"compression": "none", "row_group_size": 2, "data_page_size": 64}, False),  # several values per chunk
    ({"compression": "zstd", "row_group_size": 3}, True),
])
def test_uncompressed_caches_are_read_page_by_page_others_through_arrow(tmp_path, monkeypatch, options,
                                                                        through_arrow):
    import sds.io

    rows = [torch.randn(6, 5) for _ in range(7)]
    _cache_with_pyarrow(tmp_path / "c.parquet", rows, **options)
    arrow_reads = []
    real = sds.io._iter_parquet_through_arrow
    monkeypatch.setattr(sds.io, "_iter_parquet_through_arrow", lambda *a: arrow_reads.append(1) or real(*a))
    back = list(iter_parquet_tensors(tmp_path / "c.parquet"))
    assert bool(arrow_reads) == through_arrow
    assert len(back) == 7 and all(torch.equal(a, b) for a, b in zip(rows, back))


def test_damaged_page_structure_is_named_without_a_checksum(tmp_path):
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
