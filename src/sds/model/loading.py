"""Loading a checkpoint: whole (evaluation) or one decoder layer at a time (`LayerwiseModel`, the compression
stages), and writing one back as a loadable folder."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..core.architectures import check_supported, check_tokenizer, read_model_config, resolve_model_dir
from ..core.errors import ArchitectureError, ModelError
from ..storage.safetensors import SafetensorsFile, SafetensorsStreamWriter, verify_folder
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


def load_tokenizer(folder: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer of a model folder; one without tokenizer files is named (transformers would build an
    empty tokenizer, and every text would tokenize to nothing)."""
    from transformers import AutoTokenizer

    try:
        check_tokenizer(folder)
    except ArchitectureError as exc:
        raise ModelError(str(exc)) from None
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


def load_model(source: str | Path, *, dtype: str = "float32", trust_remote_code: bool = False,
               device: str = "cpu"):
    """Loads a causal LM and its tokenizer from a local directory or hub id (offline caches honoured)."""
    from transformers import AutoModelForCausalLM

    source = model_folder(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(source), dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True)
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    except (OSError, SafetensorError) as exc:  # SafetensorError: a header the library refuses
        raise ModelError(f"cannot load model {str(source)!r}: {' '.join(str(exc).split())}") from None
    model.config.use_cache = False
    model.eval()
    decoder_layers(model)  # fail early on an unsupported architecture
    return model.to(device), tokenizer


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name → safetensors file holding it (a single file or a sharded checkpoint's index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

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

    def __init__(self, source: str | Path, *, dtype: str = "float32", trust_remote_code: bool = False,
                 device: str = "cpu"):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        source = model_folder(source)
        self.folder, self.device, self.dtype = source, torch.device(device), getattr(torch, dtype)
        try:
            config = AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype),
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
        head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
        for name, param in model.named_parameters():
            if name.startswith(self.prefix + ".") or (head_name and name.startswith(head_name + ".")):
                continue
            _assign_parameter(model, name, self.read(name, param.dtype))

    def __len__(self) -> int:
        return len(self.layers)

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
        """Writes a loadable folder (config + one model.safetensors): every checkpoint tensor, taking the
        ones `replaced` holds (a mapping, e.g. a TensorReader of new linear weights) from there. One tensor
        is in memory at a time. Parameters are written in the model's dtype, as save_pretrained would."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        specs = {}
        for name in sorted(self._files):
            stored_dtype, shape = self._open[self._files[name]].spec(name)
            specs[name] = (params[name].dtype if name in params else stored_dtype, shape)
        with SafetensorsStreamWriter(out / "model.safetensors", specs) as writer:
            for name, (dtype, _) in specs.items():
                tensor = replaced[name] if name in replaced else self._open[self._files[name]][name]
                writer.write(name, tensor.to(dtype))
        self.model.config.save_pretrained(out)
        if self.model.can_generate():
            self.model.generation_config.save_pretrained(out)


def apply_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Overwrites parameters named in `weights` (full state-dict names); unknown names are an error."""
    params = dict(model.named_parameters())
    missing = [k for k in weights if k not in params]
    if missing:
        raise ModelError(f"checkpoint names {len(missing)} tensors the model lacks, e.g. {missing[0]!r}")
    with torch.no_grad():
        for key, value in weights.items():
            params[key].copy_(value.to(params[key].dtype))
