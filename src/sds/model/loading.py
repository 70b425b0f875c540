"""Loading a checkpoint: whole (evaluation) or one decoder layer at a time (`LayerwiseModel`, the compression
stages), and writing one back as a loadable folder."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..core.architectures import (check_supported, check_tokenizer, model_files, read_model_config,
                                  resolve_model_dir, source_dtype)
from ..core.errors import ArchitectureError, ModelError
from ..storage.documents import copy_file, read_json, write_json, write_text
from ..storage.safetensors import SafetensorsFile, SafetensorsStreamWriter, TensorReader, verify_folder
from .decoder import decoder_layers, decoder_layers_prefix, find_linears, layer_kwargs


def model_folder(source: str | Path) -> Path:
    """The checked folder of a model: a local save_pretrained folder, or a Hugging Face id's snapshot in
    the local cache. It must hold config.json and safetensors weights of a supported architecture; files
    this pipeline wrote with checksums are verified."""
    try:
        folder = resolve_model_dir(str(source))
        check_supported(read_model_config(folder), 0, str(source))
    except ArchitectureError as exc:
        raise ModelError(str(exc)) from None
    verify_folder(folder)
    return folder


def run_dtype(folder: str | Path, setting: str) -> torch.dtype:
    """The dtype a stage runs (and writes) a model in: config `model.dtype`, where 'auto' is the one the
    checkpoint's config.json declares."""
    if setting != "auto":
        return getattr(torch, setting)
    try:
        return getattr(torch, source_dtype(read_model_config(folder)))
    except ArchitectureError as exc:
        raise ModelError(str(exc)) from None


def load_tokenizer(folder: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer of a model folder; one without tokenizer files is named (transformers would build an
    empty tokenizer, and every text would tokenize to nothing)."""
    from transformers import AutoTokenizer

    try:
        check_tokenizer(folder)
    except ArchitectureError as exc:
        raise ModelError(str(exc)) from None
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


def load_model(source: str | Path, *, dtype: str = "auto", trust_remote_code: bool = False,
               device: str = "cpu", **from_pretrained):
    """Loads a causal LM whole, and its tokenizer, from a local directory or hub id (offline caches honoured).
    `from_pretrained`: further arguments (e.g. an accelerate device_map that offloads what does not fit)."""
    from transformers import AutoModelForCausalLM

    source = model_folder(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(source), dtype=run_dtype(source, dtype), trust_remote_code=trust_remote_code, use_safetensors=True,
            **from_pretrained)
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    except (OSError, SafetensorError) as exc:  # SafetensorError: a header the library refuses
        raise ModelError(f"cannot load model {str(source)!r}: {' '.join(str(exc).split())}") from None
    model.config.use_cache = False
    model.eval()
    decoder_layers(model)  # fail early on an unsupported architecture
    return (model if "device_map" in from_pretrained else model.to(device)), tokenizer


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name → safetensors file holding it (a single file or a sharded checkpoint's index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / shard for name, shard in json.loads(index.read_text())["weight_map"].items()}
    files = {}
    for f in sorted(folder.glob("*.safetensors")):
        reader = SafetensorsFile(f)
        files.update(dict.fromkeys(reader.keys(), f))
        reader.close()
    return files


def _assign_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    (module.get_submodule(owner) if owner else module)._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


class LayerwiseModel:
    """A causal LM whose decoder layers stay on disk until a pass asks for one, so a layer-by-layer stage
    holds one decoder layer (plus embeddings and norms) whatever the model's depth.

    The module tree is built with parameters on the meta device (buffers such as rotary tables are real);
    everything outside the decoder layers is read from the checkpoint at once, except the output head,
    which no layer-wise pass runs (inputs are captured at layer 0). `layer(i)` reads layer i's tensors;
    `release(i)` puts them back on the meta device."""

    def __init__(self, source: str | Path, *, dtype: str = "auto", trust_remote_code: bool = False,
                 device: str = "cpu"):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        source = model_folder(source)
        self.folder, self.device, self.dtype = source, torch.device(device), run_dtype(source, dtype)
        try:
            config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=self.dtype,
                                                         trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot build model {str(source)!r}: {exc}") from exc
        model.config.use_cache = False
        model.eval()
        self.model, self.layers, self.prefix = model, decoder_layers(model), decoder_layers_prefix(model)
        self._files = _checkpoint_files(self.folder)
        self._open = {f: SafetensorsFile(f) for f in set(self._files.values())}  # plain reads, not mapped
        for module in model.modules():
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(self.device)
        head = model.get_output_embeddings()
        self._head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
        for name, param in model.named_parameters():
            if name.startswith(self.prefix + ".") or (self._head_name and name.startswith(self._head_name + ".")):
                continue
            _assign_parameter(model, name, self.read(name, param.dtype))

    def __len__(self) -> int:
        return len(self.layers)

    def head(self) -> nn.Module:
        """The output head with its weights (read now; a tied head shares the input embeddings' tensor):
        only evaluation runs it."""
        head = self.model.get_output_embeddings()
        for name, param in list(head.named_parameters()):
            full = f"{self._head_name}.{name}"
            if not param.is_meta:
                continue
            if full in self._files:
                _assign_parameter(head, name, self.read(full, param.dtype))
            elif name == "weight" and getattr(self.model.config, "tie_word_embeddings", False):
                head._parameters[name] = self.model.get_input_embeddings().weight
            else:
                raise ModelError(f"checkpoint {self.folder} has no tensor {full!r} (an untied output head)")
        return head

    def device_map(self, budget: int) -> dict[str, str | int]:
        """Where accelerate puts each part of the model loaded whole in `budget` bytes: the embeddings, then
        decoder layers, final norm and head in forward order, on this model's device while they fit, the
        rest on disk (a tied head with the embeddings). Decided from sizes alone, so the same budget always
        gives the same placement; the embeddings come first, so the model's device is where inputs go."""
        device = (self.device.index or 0) if self.device.type == "cuda" else "cpu"
        size = self.dtype.itemsize
        units: dict[str, int] = {}
        for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if name.startswith(self.prefix + "."):
                unit = ".".join(name.split(".")[:len(self.prefix.split(".")) + 1])
            else:
                unit = name.rpartition(".")[0]
            units[unit] = units.get(unit, 0) + tensor.numel() * size
        placement, used = {}, 0
        for unit, nbytes in units.items():
            used += nbytes
            placement[unit] = device if used <= budget or not placement else "disk"
        if self._head_name and self._head_name not in placement:  # tied: the embeddings' own tensor
            placement[self._head_name] = next(iter(placement.values()))
        return placement

    def weights_bytes(self) -> int:
        """Bytes of every checkpoint tensor in the dtype this model runs in (what loading it whole takes)."""
        total = 0
        for name, f in self._files.items():
            _, shape = self._open[f].spec(name)
            total += int(torch.Size(shape).numel()) * self.dtype.itemsize
        return total

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor of the checkpoint, on the model's device (cast to `dtype` if given)."""
        if name not in self._files:
            raise ModelError(f"checkpoint {self.folder} has no tensor {name!r}")
        tensor = self._open[self._files[name]][name]
        return tensor.to(self.device, dtype) if dtype is not None else tensor.to(self.device)

    def checkpoint_names(self) -> list[str]:
        return list(self._files)

    def layer(self, i: int) -> nn.Module:
        """Decoder layer i with its checkpoint weights (read now unless already in memory)."""
        layer = self.layers[i]
        for name, param in list(layer.named_parameters()):
            if param.is_meta:
                _assign_parameter(layer, name, self.read(f"{self.prefix}.{i}.{name}", param.dtype))
        return layer

    def release(self, i: int) -> None:
        """Drops decoder layer i's weights (back to the meta device)."""
        layer = self.layers[i]
        for name, param in list(layer.named_parameters()):
            _assign_parameter(layer, name, torch.empty_like(param, device="meta"))

    def linear_names(self, i: int) -> dict[str, str]:
        """Linear name within layer i → full state-dict name of its weight."""
        return {name: f"{self.prefix}.{i}.{name}.weight" for name in find_linears(self.layers[i])}

    def linear_specs(self, layers) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Full weight name → (dtype, shape) of every linear of the given layers, in layer order."""
        return {full: (mod.weight.dtype, tuple(mod.weight.shape)) for i in layers
                for name, full in self.linear_names(i).items() for mod in [self.layers[i].get_submodule(name)]}

    def kwargs(self, seqlen: int) -> dict:
        return layer_kwargs(self.model, seqlen)

    def dims(self) -> dict:
        """hidden, ffn and heads of the decoder layers (for sizing forward batches)."""
        cfg = self.model.config
        ffn = getattr(cfg, "ffn_dim", None) or getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
        return {"hidden": cfg.hidden_size, "ffn": ffn, "heads": cfg.num_attention_heads}

    def save_pretrained(self, out: str | Path, replaced) -> None:
        """Writes a loadable folder: every checkpoint tensor, taking the ones `replaced` holds (a mapping,
        e.g. a TensorReader of new linear weights) from there, in this model's dtype (the checkpoint's own
        with `model.dtype: auto`) and in the checkpoint's own files: the same shards under the same names,
        with an index where it has one. One tensor is in memory at a time. config.json and
        generation_config.json are the source's files, unchanged but for the dtype when it differs."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        shards: dict[str, dict] = {}
        for name in sorted(self._files):
            stored_dtype, shape = self._open[self._files[name]].spec(name)
            shards.setdefault(self._files[name].name, {})[name] = (
                params[name].dtype if name in params else stored_dtype, shape)
        total = 0
        for shard, specs in sorted(shards.items()):
            with SafetensorsStreamWriter(out / shard, specs) as writer:
                for name, (dtype, _) in specs.items():
                    tensor = replaced[name] if name in replaced else self._open[self._files[name]][name]
                    writer.write(name, tensor.to(dtype))
                    total += tensor.numel() * dtype.itemsize
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            source_index = read_json(index)
            weight_map = {name: shard for shard, specs in sorted(shards.items()) for name in specs}
            write_json(out / index.name, {**source_index, "metadata": {**source_index.get("metadata", {}),
                                                                       "total_size": total},
                                          "weight_map": dict(sorted(weight_map.items()))})
        self._copy_configs(out)

    def _copy_configs(self, out: Path) -> None:
        """config.json and generation_config.json as the source has them (re-serialising them through the
        installed transformers would rename keys that older readers and serving stacks look for, e.g.
        rope_scaling), with the dtype key set to the one written when it differs."""
        config = read_json(self.folder / "config.json")
        written = str(self.dtype).removeprefix("torch.")
        key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
        if config.get(key, "float32") == written:
            copy_file(self.folder / "config.json", out / "config.json")
        else:
            write_text(out / "config.json", json.dumps({**config, key: written}, indent=2) + "\n")
        if (self.folder / "generation_config.json").is_file():
            copy_file(self.folder / "generation_config.json", out / "generation_config.json")

    def copy_tokenizer(self, out: str | Path) -> None:
        """The source's tokenizer files, byte for byte."""
        try:
            check_tokenizer(self.folder)
        except ArchitectureError as exc:
            raise ModelError(str(exc)) from None
        for f in map(Path, model_files(self.folder)):
            if not (f.name.endswith((".safetensors", ".safetensors.index.json"))
                    or f.name in ("config.json", "generation_config.json")):  # written by save_pretrained
                copy_file(f, Path(out) / f.name)


def whole_model(lm: LayerwiseModel, *, weights_file: Path | None, budget: int, work_dir: Path,
                trust_remote_code: bool = False) -> nn.Module:
    """The checkpoint as one model object (what lm-eval runs), with the decoder linears of `weights_file` (a
    first-prune checkpoint) where given. Loaded whole on `lm`'s device when its weights fit `budget` bytes;
    otherwise accelerate places what fits the budget there and offloads the rest to `work_dir` (the
    checkpoint with the new weights is first written there, one tensor at a time)."""
    dtype = str(lm.dtype).removeprefix("torch.")
    if lm.weights_bytes() <= budget:
        model, _ = load_model(lm.folder, dtype=dtype, trust_remote_code=trust_remote_code, device=str(lm.device))
        if weights_file is not None:  # every byte read is verified as it is read: one pass over the file
            reader = TensorReader(weights_file, device=lm.device, verify="per_tensor")
            apply_weights(model, reader)
            reader.close()
        return model
    folder = lm.folder
    if weights_file is not None:
        folder = work_dir / "model"
        lm.save_pretrained(folder, TensorReader(weights_file, device="cpu", verify="per_tensor"))
        lm.copy_tokenizer(folder)
    model, _ = load_model(folder, dtype=dtype, trust_remote_code=trust_remote_code,
                          device_map=lm.device_map(budget), offload_folder=str(work_dir / "offload"))
    return model


def apply_weights(model: nn.Module, weights) -> None:
    """Overwrites the parameters `weights` names (full state-dict names; a dict or a TensorReader, read one
    tensor at a time); unknown names are an error."""
    params = dict(model.named_parameters())
    missing = [k for k in weights.keys() if k not in params]
    if missing:
        raise ModelError(f"checkpoint names {len(missing)} tensors the model lacks, e.g. {missing[0]!r}")
    with torch.no_grad():
        for key in weights.keys():
            params[key].copy_(weights[key].to(params[key].dtype))
