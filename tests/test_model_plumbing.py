import pytest
import torch

from conftest import tiny_llama, tiny_opt
from sds.model import (ModelError, apply_weights, capture_layer_inputs, decoder_layers, find_linears, layer_kwargs,
                       load_model, run_layer)


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
