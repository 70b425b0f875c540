"""Disk you can plan (issue 24): per-tensor digests (a job reading one layer of a large checkpoint hashes that
layer, not the whole file), statistics stored as upper triangles (half the bytes, restored bit for bit)."""
import json
from pathlib import Path

import pytest
import torch

from sds.core.errors import CorruptFileError
from sds.storage import checksums, digests
from sds.storage.digests import file_digest, sidecar, tensor_sidecar
from sds.storage.safetensors import SafetensorsFile, SafetensorsStreamWriter, TensorReader, save_tensors


def _three_tensors(path, n=64):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(n, n, generator=g), "b": torch.randn(n, 2 * n, generator=g),
               "m": torch.rand(n, n, generator=g) > 0.5}
    with SafetensorsStreamWriter(path, {k: (v.dtype, v.shape) for k, v in tensors.items()},
                                 metadata={"note": "x"}) as writer:
        for k, v in tensors.items():
            writer.write(k, v)
    return tensors


def _data_span(path, name) -> tuple[int, int]:
    """The file offsets of tensor `name`'s bytes."""
    f = SafetensorsFile(path)
    try:
        _, _, begin = f._entries[name]
        dtype, shape = f.spec(name)
        return f._start + begin, f._start + begin + torch.empty(shape, dtype=dtype).numel() * dtype.itemsize
    finally:
        f.close()


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_the_writer_records_each_tensors_digest_and_the_files_without_reading_it_back(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    monkeypatch.setattr("sds.storage.atomic.file_digest", lambda p: pytest.fail("the file was read back"))
    tensors = _three_tensors(path)
    record = json.loads(tensor_sidecar(path).read_text())
    assert record["file"] == sidecar(path).read_text().strip() == file_digest(path)
    assert record["size"] == path.stat().st_size and sorted(record["tensors"]) == ["a", "b", "m"]
    for name, tensor in tensors.items():
        assert record["tensors"][name] == digests.bytes_digest(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    start, _ = _data_span(path, "a")
    assert record["header"] == digests.bytes_digest(path.read_bytes()[:start])


@pytest.mark.parametrize("verify", ["per_tensor", "file"])
def test_a_flipped_byte_inside_a_tensor_is_named(tmp_path, verify):
    path = tmp_path / "w.safetensors"
    tensors = _three_tensors(path)
    begin, end = _data_span(path, "b")
    _flip(path, (begin + end) // 2)  # the middle of the file's data
    if verify == "file":  # the whole-file check refuses the file on opening, as before
        with pytest.raises(CorruptFileError, match="w.safetensors: checksum mismatch"):
            TensorReader(path)
        return
    reader = TensorReader(path, verify="per_tensor")
    assert reader.verify == "per_tensor"
    assert torch.equal(reader["a"], tensors["a"]) and torch.equal(reader["m"], tensors["m"])
    with pytest.raises(CorruptFileError, match=r"w.safetensors: checksum mismatch in tensor 'b' \(truncated or "
                                               r"altered\); delete it and re-run snakemake") as err:
        reader["b"]
    assert err.value.path == path, "the CLI removes the output holding the file it names"


def test_reading_one_tensor_per_tensor_hashes_that_tensor_and_the_header_only(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    tensors = _three_tensors(path, n=256)
    hashed = []
    real = digests.bytes_digest
    monkeypatch.setattr(digests, "bytes_digest",
                        lambda data: hashed.append(len(memoryview(data).cast("B"))) or real(data))
    monkeypatch.setattr(checksums, "file_digest", lambda p: pytest.fail("the whole file was hashed"))
    reader = TensorReader(path, verify="per_tensor")
    assert torch.equal(reader["a"], tensors["a"])
    header, _ = _data_span(path, "a")
    assert hashed == [header, tensors["a"].numel() * 4]
    assert sum(hashed) < path.stat().st_size / 3


def test_a_file_without_per_tensor_digests_is_verified_whole(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    tensors = _three_tensors(path)
    calls = []
    real = checksums.file_digest
    monkeypatch.setattr(checksums, "file_digest", lambda p: calls.append(p) or real(p))
    tensor_sidecar(path).unlink()
    reader = TensorReader(path, verify="per_tensor")
    assert reader.verify == "file" and calls == [path] and torch.equal(reader["b"], tensors["b"])
    begin, end = _data_span(path, "b")
    _flip(path, begin + 3)
    with pytest.raises(CorruptFileError, match="w.safetensors: checksum mismatch"):
        TensorReader(path, verify="per_tensor")


def test_per_tensor_digests_of_another_version_of_the_file_are_not_trusted(tmp_path):
    """A file replaced with its checksum re-written (e.g. by hand) but its per-tensor sidecar left behind:
    verified whole (and found good), not refused by stale per-tensor digests."""
    path = tmp_path / "w.safetensors"
    _three_tensors(path)
    stale = tensor_sidecar(path).read_text()
    save_tensors(path, {"a": torch.ones(3)})
    tensor_sidecar(path).write_text(stale)
    reader = TensorReader(path, verify="per_tensor")
    assert reader.verify == "file" and torch.equal(reader["a"], torch.ones(3))
    tensor_sidecar(path).write_text("{not json")
    assert TensorReader(path, verify="per_tensor").verify == "file"


@pytest.mark.parametrize("damage", ["header", "truncate", "grow"])
def test_per_tensor_reads_check_the_header_and_the_size_on_opening(tmp_path, damage):
    path = tmp_path / "w.safetensors"
    _three_tensors(path)
    data = path.read_bytes()
    if damage == "header":  # same length, still valid JSON and tiling: only the digest sees it
        path.write_bytes(data.replace(b'"note":"x"', b'"note":"y"'))
        match = "w.safetensors: checksum mismatch in the header"
    else:
        path.write_bytes(data[:-7] if damage == "truncate" else data + b"\0" * 8)
        match = r"w.safetensors: checksum mismatch \(truncated or altered: \d+ bytes where \d+ were written\)"
    with pytest.raises(CorruptFileError, match=match):
        TensorReader(path, verify="per_tensor")


def test_verify_mode_is_checked_and_a_removed_output_takes_its_per_tensor_sidecar(tmp_path):
    from sds.storage.records import discard_stage_output

    path = tmp_path / "results" / "r" / "w.safetensors"
    with pytest.raises(ValueError, match="verify must be one of"):
        TensorReader(path, verify="lazy")
    from sds.storage.atomic import TempFile

    path.parent.mkdir(parents=True)
    save_tensors(path, {"a": torch.ones(2)})
    temp = TempFile(path)  # a stage's own file output: with its ownership record
    temp.tmp.write_bytes(path.read_bytes())
    temp.commit(record=True)
    assert tensor_sidecar(path).is_file()
    assert discard_stage_output(path, tmp_path / "results" / "r") == path.resolve()
    assert list(path.parent.iterdir()) == []


# --- statistics ---------------------------------------------------------------------------------------


def _accumulator(widths=(96, 160), batches=3, tokens=50):
    from sds.model.statistics import StatsAccumulator

    g = torch.Generator().manual_seed(1)
    acc = StatsAccumulator(cross=False)
    for _ in range(batches):
        shared = torch.randn(tokens, widths[0], generator=g) * torch.logspace(-2, 2, widths[0])
        acc.add({"q": shared, "k": shared, "v": shared, "down": torch.randn(tokens, widths[1], generator=g)}, None)
    return acc


def _old_form(acc):
    """The statistics as the previous version saved them: every H whole, no format field."""
    tensors = {owner: sums[0] / max(acc.tokens, 1) for owner, sums in acc._sums.items()}
    return tensors, {"groups": json.dumps(acc._groups), "tokens": str(acc.tokens)}


def test_saved_statistics_restore_every_H_bit_for_bit_in_half_the_bytes(tmp_path):
    from sds.model.statistics import STATS_FORMAT, StatsAccumulator
    from sds.storage.safetensors import load_tensors_with_metadata

    acc = _accumulator()
    tensors, meta = acc.to_tensors()
    assert meta["stats_format"] == STATS_FORMAT and {t.dim() for t in tensors.values()} == {1}
    save_tensors(tmp_path / "new.safetensors", tensors, meta)
    save_tensors(tmp_path / "old.safetensors", *_old_form(acc))
    new = StatsAccumulator.from_tensors(*load_tensors_with_metadata(tmp_path / "new.safetensors"))
    old = StatsAccumulator.from_tensors(*load_tensors_with_metadata(tmp_path / "old.safetensors"))
    for name in ("q", "k", "v", "down"):
        H = acc.stats(name).H
        for restored in (new, old):  # the old form is read as it was
            assert torch.equal(restored.stats(name).H, H), name
            assert restored.stats(name).H.is_contiguous()
    ratio = (tmp_path / "new.safetensors").stat().st_size / (tmp_path / "old.safetensors").stat().st_size
    full = 96 ** 2 + 160 ** 2
    assert ratio == pytest.approx((96 * 97 + 160 * 161) / 2 / full, abs=0.01)  # about half (n + 1) / 2n
    assert ratio < 0.52


@pytest.mark.parametrize("n", [1, 5, 128, 300])  # one tile, a partial one, several and a partial last one
def test_upper_triangles_are_triu_indices_order_and_restore_exactly(n):
    from sds.model.statistics import pack_symmetric, unpack_symmetric

    A = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
    H = A + A.mT  # exactly symmetric: a + b == b + a (x.T @ x is too at real widths, not always at tiny ones)
    packed = pack_symmetric(H)
    assert torch.equal(packed, H[tuple(torch.triu_indices(n, n))])
    assert torch.equal(unpack_symmetric(packed, n), H)
    if n > 1:
        bent = H.clone()
        bent[n - 1, 0] = torch.nextafter(bent[n - 1, 0], torch.tensor(float("inf")))  # the farthest tile, 1 ulp
        assert pack_symmetric(bent) is None


def test_an_H_not_exactly_symmetric_is_stored_whole(tmp_path):
    from sds.model.statistics import StatsAccumulator
    from sds.storage.safetensors import load_tensors_with_metadata

    acc = _accumulator()
    acc._sums["down"][0][3, 5] += 1e-3  # as a GEMM that summed the halves in different orders could give
    tensors, meta = acc.to_tensors()
    assert tensors["down"].dim() == 2 and tensors["q"].dim() == 1
    save_tensors(tmp_path / "s.safetensors", tensors, meta)
    back = StatsAccumulator.from_tensors(*load_tensors_with_metadata(tmp_path / "s.safetensors"))
    assert torch.equal(back.stats("down").H, acc.stats("down").H)


@pytest.mark.parametrize("change", ["format", "shape", "layout"])
def test_statistics_of_an_unknown_form_name_the_file_and_prune1(tmp_path, change):
    from sds.model.statistics import StatsAccumulator

    tensors, meta = _accumulator().to_tensors()
    if change == "format":
        meta["stats_format"] = "triu-9"
    elif change == "shape":
        tensors["q"] = tensors["q"][:-1]
    else:
        meta["layout"] = "{"
    source = tmp_path / "stats" / "layer_003.safetensors"
    with pytest.raises(CorruptFileError, match=r"stats/layer_003.safetensors: .*; re-run prune1") as err:
        StatsAccumulator.from_tensors(tensors, meta, source=source)
    assert err.value.path == source


# --- a layer-parallel reconstruction job on the micro run --------------------------------------------------


def test_a_layer_job_hashes_only_its_layer_of_prune1_and_names_a_damaged_one(micro_run, tmp_path, monkeypatch):
    """reconstruct_one_layer reads prune1's weights and masks per tensor: a damaged tensor of layer 1 does not
    stop layer 0's job (nothing of prune1's checkpoint is hashed whole), and layer 1's job names it."""
    import shutil

    from sds.core.layout import MASKS, WEIGHTS
    from sds.stages.compress import reconstruct_one_layer

    work, _, _ = micro_run
    R = work / "results" / "micro"
    (config_file,) = (R / "config").glob("*.json")
    config = json.loads(config_file.read_text())
    prune1 = tmp_path / "results" / "micro" / "sparsegpt" / "2of4" / "prune1"
    shutil.copytree(R / "sparsegpt" / "2of4" / "prune1", prune1)
    damaged = next(n for n in SafetensorsFile(prune1 / WEIGHTS).keys() if ".layers.1." in n and "fc1" in n)
    begin, end = _data_span(prune1 / WEIGHTS, damaged)
    _flip(prune1 / WEIGHTS, (begin + end) // 2)
    hashed_whole = []
    real = checksums.file_digest
    monkeypatch.setattr(checksums, "file_digest", lambda p: hashed_whole.append(Path(p).name) or real(p))
    args = dict(config=config, model_dir=str(R / "model"), inputs_dir=str(R / "activations" / "input"),
                prune1_dir=str(prune1), recon="default")
    reconstruct_one_layer(**args, layer="0", out=str(tmp_path / "layer0"))
    assert (tmp_path / "layer0" / WEIGHTS).is_file()
    assert WEIGHTS not in hashed_whole and MASKS not in hashed_whole, hashed_whole
    with pytest.raises(CorruptFileError, match=rf"prune1/weights.safetensors: checksum mismatch in tensor "
                                               rf"'{damaged}'") as err:
        reconstruct_one_layer(**args, layer="1", out=str(tmp_path / "layer1"))
    assert err.value.path == prune1 / WEIGHTS and not (tmp_path / "layer1").exists()
    from sds.model.statistics import STATS_FORMAT

    for stats in sorted((prune1 / "stats").glob("*.safetensors")):  # what the layer jobs fitted on
        assert SafetensorsFile(stats).metadata()["stats_format"] == STATS_FORMAT, stats


@pytest.mark.parametrize("columns", [1, 7, 8, 13, 64])
def test_masks_are_stored_eight_per_byte_and_read_back_exactly(tmp_path, columns):
    """A checkpoint's masks file holds one bit per weight (numpy's little-endian packbits layout, so users
    can unpack it without this package), and the stages' reader restores the boolean masks."""
    import numpy as np

    from sds.model.checkpoints import MASK_FORMAT, MaskReader, pack_mask
    from sds.storage.safetensors import SafetensorsStreamWriter

    masks = {f"m{i}": torch.rand(5, columns, generator=torch.Generator().manual_seed(i)) > 0.5 for i in range(3)}
    path = tmp_path / "masks.safetensors"
    packed = {k: pack_mask(m) for k, m in masks.items()}
    with SafetensorsStreamWriter(path, {k: (torch.uint8, tuple(p.shape)) for k, p in packed.items()},
                                 {"mask_format": MASK_FORMAT, "columns": json.dumps({k: columns for k in masks})}) as w:
        for k, p in packed.items():
            w.write(k, p)
    reader = MaskReader(path, device="cpu")
    assert all(reader.file.spec(k)[1] == (5, -(-columns // 8)) for k in masks)  # one bit per weight
    for k, m in masks.items():
        assert torch.equal(reader[k], m)
        unpacked = np.unpackbits(packed[k].numpy(), axis=1, bitorder="little")[:, :columns]
        assert np.array_equal(unpacked.astype(bool), m.numpy())
