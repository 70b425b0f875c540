"""A test-only torch function mode that fails any operation whose tensor arguments live on different
devices, naming the operation and the devices: on a CPU-only machine it catches code that would mix the
GPU with the host (for example statistics read to the CPU and multiplied with weights on the device), when
reads that name no device are sent to "meta" (sds.storage.safetensors.DEFAULT_READ_DEVICE) for the test."""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

# Moving data between devices is what these are for; everything else must see one device.
_TRANSFERS = {"to", "copy_", "cpu", "cuda", "pin_memory", "numpy", "tolist", "item", "__reduce_ex__",
              "_make_subclass", "__deepcopy__", "__setstate__"}


class DeviceMixingError(RuntimeError):
    pass


class DeviceGuard(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.checked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name not in _TRANSFERS:
            flat, _ = tree_flatten((args, kwargs))
            # 0-dim CPU tensors are scalars, which PyTorch lets any device combine with
            devices = {t.device for t in flat if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu")}
            if len(devices) > 1:
                raise DeviceMixingError(f"{name} mixes tensors on {', '.join(sorted(map(str, devices)))}")
            self.checked += 1
        return func(*args, **kwargs)
