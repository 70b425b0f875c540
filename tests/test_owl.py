"""OWL (outlier-weighted layerwise sparsity): the per-layer ratios, one layer's outlier fraction, the config's
refusal of N:M, and prune1/prune2 pruning each layer to its ratio on a tiny model."""
import pytest
import torch

from sds.algorithms.owl import input_norms_from_hessian, layer_pattern, outlier_fraction, owl_ratios
from sds.core.config import validate_config
from sds.core.errors import ConfigError
from sds.core.patterns import Pattern, parse_pattern


@pytest.mark.parametrize("fractions", [[0.01, 0.02, 0.05, 0.03], [0.001, 0.001, 0.001, 0.2],
                                       [0.2, 0.19, 0.18, 0.001, 0.0], [0.3, 0.1]])
@pytest.mark.parametrize("target,lam", [(0.5, 0.08), (0.7, 0.08), (0.6, 0.2)])
def test_ratios_average_to_the_target_within_the_bounds(fractions, target, lam):
    ratios = owl_ratios(fractions, target, lam)
    assert len(ratios) == len(fractions)
    assert sum(ratios) / len(ratios) == pytest.approx(target, abs=1e-12)
    assert all(target - lam - 1e-12 <= r <= target + lam + 1e-12 for r in ratios)
    # more outliers → lower sparsity, strictly where the fractions differ
    for a in range(len(fractions)):
        for b in range(len(fractions)):
            if fractions[a] > fractions[b]:
                assert ratios[a] < ratios[b]
    assert max(ratios) - min(ratios) > lam  # the profile is spread, not near uniform


def test_a_symmetric_distribution_gets_the_papers_full_range():
    """Outlier fractions spread evenly: the paper's mapping, the layers from target − λ to target + λ."""
    ratios = owl_ratios([0.0, 0.01, 0.02, 0.03, 0.04], 0.5, 0.08)
    assert ratios == pytest.approx([0.58, 0.54, 0.50, 0.46, 0.42], abs=1e-12)


def test_equal_fractions_give_the_uniform_profile():
    assert owl_ratios([0.02, 0.02, 0.02], 0.7, 0.08) == [0.7, 0.7, 0.7]
    assert owl_ratios([0.01, 0.05], 0.5, 0.0) == [0.5, 0.5]


def test_ratios_refuse_a_lambda_leaving_zero_one():
    with pytest.raises(ValueError, match="outside"):
        owl_ratios([0.1, 0.2], 0.95, 0.08)


def test_outlier_fraction_counts_scores_above_m_times_the_pooled_mean():
    W = torch.ones(4, 10)
    W[0, 0] = 100.0  # one large weight: score 100 against a mean of (39 + 100) / 40 ≈ 3.5
    norms = torch.ones(10)
    assert outlier_fraction({"a": W}, {"a": norms}, 5) == pytest.approx(1 / 40)
    # a large input norm makes a column's scores outliers; pooled with a second linear, one mean for both
    norms2 = torch.ones(10)
    norms2[3] = 50.0
    both = outlier_fraction({"a": torch.ones(4, 10), "b": torch.ones(2, 10)}, {"a": norms2, "b": torch.ones(10)}, 5)
    assert both == pytest.approx(4 / 60)
    # scaling every norm of the layer by one factor (H's 1/tokens) changes nothing
    assert outlier_fraction({"a": W}, {"a": norms * 7}, 5) == outlier_fraction({"a": W}, {"a": norms}, 5)
    H = torch.diag(torch.tensor([4.0, 9.0]))
    assert input_norms_from_hessian(H).tolist() == [2.0, 3.0]


def test_layer_pattern():
    pat = parse_pattern("unstructured:0.5")
    assert layer_pattern(pat, None, 3) is pat
    assert layer_pattern(pat, [0.42, 0.58], 1) == Pattern("unstructured", ratio=0.58)
    with pytest.raises(ValueError, match="unstructured"):
        layer_pattern(parse_pattern("2:4"), [0.5], 0)


def test_config_refuses_owl_with_an_nm_pattern():
    with pytest.raises(ConfigError, match=r"'prune.patterns.0': '2:4' is an N:M pattern, but prune.sparsity_profile "
                                          r"'owl'"):
        validate_config({"run": "t", "prune": {"sparsity_profile": "owl", "patterns": ["2:4"]}})
    with pytest.raises(ConfigError, match="'prune.owl_lambda' = 0.2 takes pattern 'unstructured:0.9'"):
        validate_config({"run": "t", "prune": {"sparsity_profile": "owl", "owl_lambda": 0.2,
                                               "patterns": ["unstructured:0.9"]}})
    ok = validate_config({"run": "t", "prune": {"sparsity_profile": "owl", "patterns": ["unstructured:0.7"]}})
    assert ok["prune"]["owl_threshold"] == 5 and ok["prune"]["owl_lambda"] == 0.08
    assert validate_config({"run": "t"})["prune"]["sparsity_profile"] == "uniform"
    validate_config({"run": "t", "prune": {"patterns": ["2:4"]}})  # N:M stays fine with the uniform profile


def test_profile_section_states_the_ratios():
    from sds.report.report import _profile_section

    profile = {"sparsity_profile": "owl", "layer_sparsity": [0.58, 0.42],
               "owl": {"threshold": 5, "lambda": 0.08, "outlier_fraction": [0.007, 0.009]}}
    results = [{"method": "wanda", "pattern": "unstructured:0.5", "stage": "prune1",
                "sparsity_per_layer": {"0": 0.5664, "1": 0.4062}}]
    text = "\n".join(_profile_section({("wanda", "unstructured:0.5"): profile}, results))
    assert "## Per-layer sparsity (OWL)" in text
    assert "per-layer sparsity (OWL) of wanda unstructured:0.5 (M = 5, λ = 0.08): 0: 0.5800, 1: 0.4200; mean 0.5000" \
        in text
    assert "| 0 | 0.0070 | 0.5800 | 0.5664 | – |" in text
    assert _profile_section({}, results) == []


# --- end to end: the micro workflow with sparsity_profile owl ------------------------------------------------

def test_micro_run_with_owl_prunes_every_layer_to_its_ratio(tmp_path):
    """The micro workflow with `sparsity_profile: owl` at unstructured 50 % (SparseGPT), up to the SDS
    checkpoint (no evaluation: about two minutes on 2 cores):
    the owl stage's outlier fractions match an independent recomputation on layer 0; prune1 records OWL's
    ratios (spread, mean the target); every linear of prune1's and of the SDS checkpoint's masks removes
    exactly floor(ratio · numel) at its layer's ratio, so each layer's achieved sparsity is its ratio within
    rounding and their mean the target."""
    import yaml

    from conftest import ROOT, snakemake
    from sds.model.checkpoints import MaskReader
    from sds.model.decoder import decoder_layers, find_linears, layer_kwargs
    from sds.model.loading import load_model
    from sds.model.statistics import collect_stats
    from sds.storage.documents import read_json
    from sds.storage.parquet import iter_parquet_tensors
    from sds.storage.safetensors import TensorReader

    work = tmp_path
    config = yaml.safe_load((ROOT / "config" / "micro.yaml").read_text())
    config["prune"].update(patterns=["unstructured:0.5"], sparsity_profile="owl")
    (work / "owl.yaml").write_text(yaml.safe_dump(config))
    r = work / "results" / "micro"
    p1 = r / "sparsegpt" / "unstructured50" / "prune1"
    sds = r / "sparsegpt" / "unstructured50" / "default" / "sds"
    snakemake(work, "--cores", "2", "--configfile", str(work / "owl.yaml"), "--", str(p1.relative_to(work)),
              str(sds.relative_to(work)))

    owl = read_json(r / "activations" / "owl.json", verify=True)
    assert owl["threshold"] == 5 and len(owl["outlier_fraction"]) == 2
    model, _ = load_model(r / "model")
    stream = [t.float() for t in iter_parquet_tensors(r / "activations" / "input" / "layer_000.parquet")]
    layer0 = decoder_layers(model)[0]
    acc = collect_stats(layer0, stream, layer_kwargs(model, stream[0].shape[0]))
    scores = torch.cat([(m.weight.detach().abs() * torch.diagonal(acc.stats(n).H).sqrt()).flatten()
                        for n, m in find_linears(layer0).items()])
    assert owl["outlier_fraction"][0] == pytest.approx(float((scores > 5 * scores.mean()).float().mean()), abs=1e-4)

    summary = read_json(p1 / "layers.json")
    ratios = summary["layer_sparsity"]
    assert summary["sparsity_profile"] == "owl"
    assert ratios == pytest.approx(owl_ratios(owl["outlier_fraction"], 0.5, 0.08))
    assert sum(ratios) / len(ratios) == pytest.approx(0.5, abs=1e-12)
    assert abs(ratios[0] - ratios[1]) > 0.05, "the micro model's layers differ in outliers: the ratios must differ"
    assert read_json(sds / "layers.json")["layer_sparsity"] == ratios
    card = (sds / "model" / "README.md").read_text()  # the shipped card states the ratios too
    assert "sparsity_profile: owl" in card
    for i, ratio in enumerate(ratios):
        assert f"| {i} | {ratio:.4f} |" in card

    for folder in (p1, sds):
        masks, weights = MaskReader(folder / "masks.safetensors", device="cpu"), \
            TensorReader(folder / "weights.safetensors", device="cpu")
        achieved = {}
        for name in masks.keys():
            layer = int(next(p for p in name.split(".") if p.isdigit()))
            keep, W = masks[name].bool(), weights[name]
            assert int((~keep).sum()) == int(ratios[layer] * keep.numel()), f"{folder.name} {name}"
            assert bool((W[~keep] == 0).all())
            removed, total = achieved.get(layer, (0, 0))
            achieved[layer] = (removed + int((~keep).sum()), total + keep.numel())
        per_layer = [achieved[i][0] / achieved[i][1] for i in sorted(achieved)]
        assert per_layer == pytest.approx(ratios, abs=2e-3), folder.name
        assert sum(per_layer) / len(per_layer) == pytest.approx(0.5, abs=2e-3)
