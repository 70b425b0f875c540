import pytest
import torch

from conftest import tiny_llama, tiny_opt
from sds.core.errors import ModelError
from sds.model.loading import apply_weights, load_model
from sds.model.decoder import capture_layer_inputs, decoder_layers, find_linears, layer_kwargs, run_layer


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama])
def test_layer_by_layer_equals_full_forward(make):
    model = make()
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    hidden, _ = capture_layer_inputs(model, ids)
    kwargs = layer_kwargs(model, 16)
    assert torch.allclose(hidden, full[0], atol=1e-6)
    for i, layer in enumerate(decoder_layers(model)[:-1]):
        hidden = run_layer(layer, hidden, kwargs)
        assert torch.allclose(hidden, full[i + 1], atol=1e-5), f"layer {i}"


def test_linears_found_per_architecture():
    assert set(find_linears(decoder_layers(tiny_opt())[0])) == {
        "self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"}
    assert set(find_linears(decoder_layers(tiny_llama())[0])) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"}


def test_unsupported_architecture_named():
    with pytest.raises(ModelError, match="unsupported architecture Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_missing_model_path_named(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_model_without_weights_named(tmp_path):
    model = tiny_opt()
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="no \\*.safetensors weights"):
        load_model(tmp_path)


def test_apply_weights_rejects_unknown_names():
    with pytest.raises(ModelError, match="lacks"):
        apply_weights(tiny_opt(), {"nope.weight": torch.zeros(1)})


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama])
def test_layerwise_model_matches_the_loaded_model_one_layer_at_a_time(tmp_path, make):
    from sds.model.loading import LayerwiseModel

    from transformers import AutoModelForCausalLM

    make(layers=3).save_pretrained(tmp_path)
    full = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    lm = LayerwiseModel(tmp_path)
    assert len(lm) == 3
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    hidden, _ = capture_layer_inputs(full, ids)
    kwargs, full_kwargs = lm.kwargs(16), layer_kwargs(full, 16)
    assert set(kwargs) == set(full_kwargs)
    lazy_hidden = capture_layer_inputs(lm.model, ids)[0]
    assert torch.equal(lazy_hidden, hidden)  # embeddings (and rotary tables) are real
    for i in range(3):
        assert all(p.is_meta for p in lm.layers[i].parameters())  # nothing read before it is asked for
        expected = run_layer(decoder_layers(full)[i], hidden, full_kwargs)
        got = run_layer(lm.layer(i), lazy_hidden, kwargs)
        assert torch.allclose(got, expected, atol=1e-6), f"layer {i}"
        lm.release(i)
        assert all(p.is_meta for p in lm.layers[i].parameters())
        hidden, lazy_hidden = expected, got


def test_layerwise_save_pretrained_replaces_only_the_given_tensors(tmp_path):
    from sds.storage.safetensors import save_tensors, TensorReader
    from sds.model.loading import LayerwiseModel

    from transformers import AutoModelForCausalLM

    tiny_opt(layers=2).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    lm = LayerwiseModel(tmp_path / "base")
    name = "model.decoder.layers.1.fc1.weight"
    new = torch.zeros_like(dict(base.named_parameters())[name])
    save_tensors(tmp_path / "new.safetensors", {name: new})
    lm.save_pretrained(tmp_path / "out", TensorReader(tmp_path / "new.safetensors"))
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    params = dict(out.named_parameters())
    for key, value in base.named_parameters():
        assert torch.equal(params[key], new if key == name else value), key
    assert out.lm_head.weight.data_ptr() == out.model.decoder.embed_tokens.weight.data_ptr()  # still tied


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                            intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=64, sliding_window=None)).eval()


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


@pytest.mark.parametrize("make", [tiny_opt, tiny_llama, tiny_mistral, tiny_qwen2])
def test_batched_layer_passes_equal_the_full_forward_for_every_supported_family(make):
    """A batch of sequences through the layers one at a time (the way every stage runs them) gives the
    model's own hidden states: the rotary tables, masks and grouped-query attention are passed right."""
    model = make()
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    hidden, _ = capture_layer_inputs(model, ids)
    kwargs = layer_kwargs(model, 16)
    for i, layer in enumerate(decoder_layers(model)[:-1]):
        hidden = run_layer(layer, hidden, kwargs)
        assert torch.allclose(hidden, full[i + 1], atol=1e-5), f"layer {i}"


def _save_config_only(folder, config):
    folder.mkdir()
    config.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")  # present; never read: the check needs no weights
    (folder / "tokenizer.json").write_text("{}")  # likewise


@pytest.mark.parametrize("make_config, arch", [
    (lambda: __import__("transformers").GPT2Config(n_layer=1, n_embd=8, n_head=2), "GPT2LMHeadModel"),
    (lambda: __import__("transformers").FalconConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2),
     "FalconForCausalLM"),
    (lambda: __import__("transformers").BloomConfig(n_layer=1, hidden_size=8, n_head=2), "BloomForCausalLM"),
])
def test_unsupported_architectures_are_refused_before_any_work(tmp_path, make_config, arch):
    from sds.core.errors import ConfigError
    from sds.core.config import validate_config

    config = make_config()
    config.architectures = [arch]
    _save_config_only(tmp_path / "m", config)
    cfg = {"run": "x", "model": {"source": str(tmp_path / "m")}, "calibration": {"source": __file__, "seqlen": 8},
           "evaluate": {"seqlen": 8, "datasets": {"t": __file__}}}
    with pytest.raises(ConfigError, match=rf"unsupported architecture {arch} .*supported: OPT \(opt\) and the LLaMA"):
        validate_config(cfg)
    with pytest.raises(ModelError, match=f"unsupported architecture {arch}"):
        load_model(tmp_path / "m")


def test_sliding_window_refused_only_beyond_the_window(tmp_path):
    from transformers import MistralConfig

    from sds.core.errors import ConfigError
    from sds.core.config import validate_config

    _save_config_only(tmp_path / "m", MistralConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=16,
                                                    num_attention_heads=2, num_key_value_heads=1, sliding_window=32,
                                                    max_position_embeddings=128))
    cfg = {"run": "x", "model": {"source": str(tmp_path / "m")}, "calibration": {"source": __file__, "seqlen": 32},
           "evaluate": {"seqlen": 32, "datasets": {"t": __file__}, "zeroshot": {"enabled": False}}}
    validate_config(cfg)  # within the window every layer sees the full causal context
    cfg["evaluate"]["seqlen"] = 64
    with pytest.raises(ConfigError, match="sliding-window or per-layer attention types \\(window 32\\)"):
        validate_config(cfg)
