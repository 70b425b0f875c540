"""Shipping a pruned checkpoint: the model card's front matter (base_model, the source's license, tags, pattern,
achieved sparsity), the exported folder (license files beside the card, as large as the source: dense with
zeros), and the 2:4 kernel benchmark's clean skip without CUDA."""
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, tiny_opt
from sds.core.config import validate_config
from sds.core.patterns import parse_pattern
from sds.report.modelcard import front_matter, model_card

SUMMARY = {"linears": {"model.decoder.layers.0.fc1.weight": {"rel_error": 0.25}}, "fallbacks": 0}
SPARSITY = {"overall": 0.4987, "per_layer": {0: 0.5, 1: 0.4974}}


def _card(tmp_path, source: str, folder=None, pattern="2:4", stage="sds"):
    config = validate_config({"run": "t"})
    config["model"]["source"] = source
    text = model_card(config, stage, "wanda", parse_pattern(pattern), SPARSITY, SUMMARY, folder)
    assert text.startswith("---\n")
    return front_matter(text), text


def _hub_snapshot(tmp_path, repo="HuggingFaceTB/SmolLM2-135M", readme="---\nlicense: apache-2.0\n---\n# card\n"):
    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abcd"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(readme)
    return folder


def test_a_hub_models_card_names_it_as_base_model_and_carries_its_license(tmp_path):
    folder = _hub_snapshot(tmp_path)
    for source in ("HuggingFaceTB/SmolLM2-135M", str(folder)):  # the id, or the cache's snapshot folder
        meta, text = _card(tmp_path, source, folder)
        assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
        assert meta["license"] == "apache-2.0"
        assert meta["tags"] == ["pruned", "sds", "sparse", "2:4"]
        assert meta["sparsity_pattern"] == "2:4" and meta["sparsity"] == SPARSITY["overall"]
        assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
        assert "dense with zeros" in text.lower() and "to_sparse_semi_structured" in text
        assert "\n# SDS (Sparse-Dense-Sparse) pruned model\n" in text


def test_the_license_of_a_source_without_one_in_its_card_comes_from_its_license_file(tmp_path):
    cases = {"mit": ("MIT License\n\nCopyright (c) 2024 someone\n", {"license": "mit"}),
             "apache": ("\n                                 Apache License\n                           Version 2.0, "
                        "January 2004\n", {"license": "apache-2.0"}),
             "custom": ("LLAMA 3.2 COMMUNITY LICENSE AGREEMENT\n", {"license": "other", "license_name": "source-license",
                                                                   "license_link": "LICENSE"})}
    for name, (text, expected) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "README.md").write_text("# no front matter\n")
        (folder / "LICENSE").write_text(text)
        meta, _ = _card(tmp_path, str(folder), folder, pattern="unstructured:0.5")
        assert {k: meta[k] for k in ("license", "license_name", "license_link") if k in meta} == expected, name
        assert "base_model" not in meta, "a plain local folder has no hub id"
        assert meta["tags"][-1] == meta["sparsity_pattern"] == "unstructured:0.5"
    bare = tmp_path / "bare"
    bare.mkdir()
    meta, text = _card(tmp_path, str(bare), bare)
    assert "license" not in meta and "the source states none" in text


def test_the_built_in_model_has_no_base_model_and_no_license(tmp_path):
    meta, text = _card(tmp_path, "builtin", tmp_path, stage="prune1")
    assert "base_model" not in meta and "license" not in meta
    assert meta["tags"] == ["pruned", "sds", "sparse", "2:4"]
    assert "built-in demo model" in text


def test_an_owl_checkpoints_card_states_each_layers_ratio_beside_its_achieved_sparsity():
    config = validate_config({"run": "t", "prune": {"sparsity_profile": "owl", "patterns": ["unstructured:0.5"]}})
    owl = {**SUMMARY, "sparsity_profile": "owl", "layer_sparsity": [0.5381, 0.4619],
           "owl": {"threshold": 5, "lambda": 0.08, "outlier_fraction": [0.01, 0.03]}}
    sparsity = {"overall": 0.5, "per_layer": {0: 0.5379, 1: 0.4617}}
    text = model_card(config, "sds", "wanda", parse_pattern("unstructured:0.5"), sparsity, owl)
    assert front_matter(text)["sparsity_profile"] == "owl"
    assert "OWL (outlier-weighted layerwise sparsity" in text and "0.4619-0.5381 (mean 0.5000)" in text
    assert "M = 5, λ = 0.08" in text
    assert "| decoder layer | target | sparsity |" in text
    assert "| 0 | 0.5381 | 0.5379 |" in text and "| 1 | 0.4619 | 0.4617 |" in text
    uniform = model_card(config, "sds", "wanda", parse_pattern("unstructured:0.5"), sparsity, SUMMARY)
    assert front_matter(uniform)["sparsity_profile"] == "uniform"
    assert "OWL" not in uniform and "| 0 | 0.5379 |" in uniform


def test_an_exported_folder_carries_the_sources_license_file_and_is_as_large_as_the_source(tmp_path):
    """write_model_folder: the card's front matter parses, the source's LICENSE is copied byte for byte, and
    the folder's weights take the source's bytes (pruned weights are stored as zeros: no size saving)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from sds.model.checkpoints import write_model_folder
    from sds.model.loading import LayerwiseModel
    from sds.storage.safetensors import save_tensors

    base = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "r1"
    model = tiny_opt(layers=2)
    model.save_pretrained(base)
    state = model.state_dict()
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")),
                            unk_token="<unk>").save_pretrained(base)
    (base / "LICENSE").write_text("MIT License\n\nCopyright (c) 2026 the authors\n")
    lm = LayerwiseModel(base)
    pruned = {}
    for i in range(len(lm)):
        for name, full in lm.linear_names(i).items():
            W = state[full].clone()
            W[:, ::2] = 0  # half the inputs removed
            pruned[full] = W
    save_tensors(tmp_path / "weights.safetensors", pruned)
    config = validate_config({"run": "t"})
    config["model"]["source"] = str(base)
    zeros = sum(int((w == 0).sum()) for w in pruned.values()) / sum(w.numel() for w in pruned.values())
    card = model_card(config, "sds", "magnitude", parse_pattern("unstructured:0.5"),
                      {"overall": zeros, "per_layer": {0: zeros, 1: zeros}}, SUMMARY, lm.folder)
    out = tmp_path / "out"
    write_model_folder(lm, tmp_path / "weights.safetensors", out, card)
    assert (out / "LICENSE").read_bytes() == (base / "LICENSE").read_bytes()
    meta = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert meta["base_model"] == "org/tiny" and meta["license"] == "mit" and meta["sparsity"] == pytest.approx(0.5)
    assert (out / "model.safetensors").stat().st_size == (base / "model.safetensors").stat().st_size
    model = AutoModelForCausalLM.from_pretrained(out)
    params = dict(model.named_parameters())
    for full, W in pruned.items():
        assert torch.equal(params[full], W), full


def test_the_semi_structured_bench_skips_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the bench measures instead of skipping")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "semi_structured_bench.py")], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("skipped: no CUDA device")
    assert "Traceback" not in proc.stderr


def test_the_bench_finds_the_2_4_linears_of_a_checkpoint(tmp_path):
    """What the bench would time on a GPU: the decoder linears whose weights hold 2:4, read from the file."""
    sys.path.insert(0, str(ROOT / "bench"))
    from semi_structured_bench import is_two_four, linear_weights

    from sds.storage.safetensors import save_tensors

    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g)
    order = torch.rand(64, 32, 4, generator=g).argsort(-1)
    two_four = W * (order < 2).reshape(64, 128)  # 2 of every 4 inputs kept
    three_four = W * (order < 3).reshape(64, 128)
    save_tensors(tmp_path / "weights.safetensors", {"model.layers.0.mlp.up_proj.weight": two_four,
                                                    "model.layers.0.mlp.down_proj.weight": three_four,
                                                    "model.embed_tokens.weight": W})
    found = dict(linear_weights(tmp_path / "weights.safetensors"))
    assert set(found) == {"model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"}
    assert is_two_four(found["model.layers.0.mlp.up_proj.weight"])
    assert not is_two_four(found["model.layers.0.mlp.down_proj.weight"])
