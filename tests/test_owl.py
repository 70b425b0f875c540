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
