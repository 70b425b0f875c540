"""One device rule: every tensor a stage computes with lives on the configured device. Checked on a CPU
machine by sending every read that names no device to "meta" and failing any op that mixes devices."""
import pytest
import torch

from device_guard import DeviceGuard, DeviceMixingError


def test_guard_fails_an_op_that_mixes_devices_and_passes_one_device():
    a, b = torch.ones(3, 3), torch.ones(3, 3, device="meta")
    with DeviceGuard():
        assert (a @ a).sum().item() == 27.0
        a * torch.tensor(2.0)  # a CPU scalar may meet any device
        with pytest.raises(DeviceMixingError, match="matmul mixes tensors on cpu, meta"):
            a @ b  # PyTorch itself returns a CPU tensor here without complaint


def _config(run_dir):
    import json

    return json.loads(next((run_dir / "config").glob("*.json")).read_text())


@pytest.mark.parametrize("stage", ["prune1_adjust", "reconstruct", "prune2"])
def test_stages_compute_on_one_device_whatever_their_inputs(micro_run, tmp_path, monkeypatch, stage):
    """The stages that read earlier stages' weights, masks and statistics, run in this process with the
    reads that name no device landing on "meta": a tensor read to the wrong place fails the guard (or the
    first use of a meta tensor), instead of being silently moved or mixed."""
    from sds.core.stage_keys import stage_config
    from sds.stages import compress as stages
    from sds.storage import safetensors as tensor_files

    work, _, _ = micro_run
    r = work / "results" / "micro"
    config = _config(r)
    config["device"] = "cpu"
    monkeypatch.chdir(work)
    monkeypatch.setattr(tensor_files, "DEFAULT_READ_DEVICE", "meta")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    config["mlflow"]["enabled"] = False
    common = dict(model_dir=str(r / "model"), inputs_dir=str(r / "activations" / "input"),
                  prune1_dir=str(r / "sparsegpt" / "2of4" / "prune1"))
    guard = DeviceGuard()
    with guard:
        if stage == "prune1_adjust":
            stages.prune1_adjust(stage_config(config, "prune1_adjust"), out=str(tmp_path / "out"), **common)
        elif stage == "reconstruct":
            stages.reconstruct(stage_config(config, "reconstruct", recon="default"), recon="default", out=str(tmp_path / "out"), **common)
        else:
            stages.prune2(stage_config(config, "prune2", method="sparsegpt", recon="default"), method="sparsegpt",
                          pattern="2of4", recon="default",
                          reconstruct_dir=str(r / "sparsegpt" / "2of4" / "default" / "reconstruct"), out=str(tmp_path / "out"), **common)
    assert guard.checked > 100, "the stage ran under the guard"
    assert (tmp_path / "out" / "weights.safetensors").is_file()
