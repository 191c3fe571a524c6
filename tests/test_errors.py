"""Every bad input gets a ValueError or TypeError whose message names the bad value."""

import pytest
import torch
from torch import nn

from conftest import make_features, make_mlp
from zoo_prune import draw_directions, get_method, keep_count, select_tokens, zo_sensitivity

P = make_mlp(dtype=torch.float32)
X = make_features(dtype=torch.float32)  # (20, 12)


def nan_at(tensor, index):
    tensor = tensor.clone()
    tensor[index] = float("nan")
    return tensor


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(h=0), ValueError, r"h=0"),
        (dict(h=-0.01), ValueError, r"h=-0.01"),
        (dict(h=float("nan")), ValueError, r"h=nan"),
        (dict(h=float("inf")), ValueError, r"h=inf"),
        (dict(m=0), ValueError, r"m=0"),
        (dict(m=-3), ValueError, r"m=-3"),
        (dict(m=2.5), TypeError, r"m must be an integer, got 2.5"),
        (dict(estimator="exact"), ValueError, r"unknown estimator 'exact'"),
        (dict(estimator="lowrank", rank=0), ValueError, r"rank=0"),
        (dict(features=nan_at(X, (3, 4))), ValueError, r"features contains NaN \(first at index \(3, 4\)"),
        (dict(features=X.index_fill(0, torch.tensor([7]), float("inf"))), ValueError, r"features contains Inf"),
        (dict(features=X[0]), ValueError, r"features must be 2-D or 3-D, got shape \(12,\)"),
        (dict(features=X[:, :10]), ValueError, r"d_v=10"),
        (dict(features=X[:, :10], estimator="fused"), ValueError, r"d_v=10 but Sequential expects inputs of width 12"),
        (dict(features=X[:, :10], estimator="closed_form"), ValueError, r"d_v=10"),
        (dict(features=X[:0]), ValueError, r"no tokens"),
        (dict(directions=torch.randn(8, 11)), ValueError, r"directions have width 11 but features have d_v=12"),
        (dict(directions=torch.randn(8, 12), m=16), ValueError, r"m=16 disagrees with the 8 rows of directions"),
        (dict(directions=torch.zeros(2, 12)), ValueError, r"zero row"),
        (dict(directions=nan_at(torch.randn(4, 12), (1, 1))), ValueError, r"directions contains NaN"),
        (dict(projector=lambda x: x), TypeError, r"projector must be a torch.nn.Module, got function"),
        (dict(seed=-1), ValueError, r"seed=-1"),
        (dict(chunk_tokens=0), ValueError, r"chunk_tokens=0"),
    ],
)
def test_zo_sensitivity_rejects(kwargs, error, message):
    args = dict(projector=P, features=X) | kwargs
    with pytest.raises(error, match=message):
        zo_sensitivity(args.pop("projector"), args.pop("features"), **args)


Z = torch.randn(10, 6)
S = torch.rand(10)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(k=11), ValueError, r"k=11 is more than the N=10 tokens"),
        (dict(k=0), ValueError, r"k=0"),
        (dict(k=-2), ValueError, r"k=-2"),
        (dict(k=2.0), TypeError, r"k must be an integer, got 2.0"),
        (dict(k=True), TypeError, r"k must be an integer, got True"),
        (dict(fusion="product"), ValueError, r"unknown fusion 'product'"),
        (dict(projected=nan_at(Z, (2, 0))), ValueError, r"projected contains NaN"),
        (dict(sensitivity=nan_at(S, 5)), ValueError, r"sensitivity contains NaN \(first at index \(5,\)"),
        (dict(sensitivity=torch.rand(9)), ValueError, r"sensitivity has shape \(9,\) but projected has \(10, 6\)"),
        (dict(sensitivity=None), ValueError, r"fusion='multiply' needs a sensitivity"),
        (dict(projected=Z[0]), ValueError, r"projected must be 2-D or 3-D, got shape \(6,\)"),
        (dict(projected=torch.ones(10, 6, dtype=torch.long)), TypeError, r"floating tensor, got dtype torch.int64"),
        (dict(fusion="random", seed=-4), ValueError, r"seed=-4"),
    ],
)
def test_select_tokens_rejects(kwargs, error, message):
    args = dict(projected=Z, k=3, sensitivity=S) | kwargs
    with pytest.raises(error, match=message):
        select_tokens(args.pop("projected"), args.pop("k"), **args)


@pytest.mark.parametrize(
    "keep, error, message",
    [
        (0, ValueError, r"keep=0"),
        (-5, ValueError, r"keep=-5"),
        (577, ValueError, r"keep=577 is more than the 576 visual tokens"),
        (0.0, ValueError, r"keep=0.0 as a ratio"),
        (1.5, ValueError, r"keep=1.5 as a ratio"),
        ("64", TypeError, r"keep must be a token count or a ratio in \(0, 1\], got '64'"),
    ],
)
def test_keep_count_rejects(keep, error, message):
    with pytest.raises(error, match=message):
        keep_count(keep, 576)


def test_keep_count_counts_and_ratios():
    assert keep_count(64, 576) == 64
    assert keep_count(0.2, 1024) == 205  # round(204.8)
    assert keep_count(0.001, 100) == 1  # at least one token


@pytest.mark.parametrize(
    "name, options, error, message",
    [
        ("fastest", {}, ValueError, r"unknown pruning method 'fastest'; available: divprune, "),
        ("zoo", dict(steps=3), TypeError, r"pruning method 'zoo' has no option 'steps'; its options: estimator, h, m"),
        ("divprune", dict(m=3), TypeError, r"'divprune' has no option 'm'"),
        ("zoo", dict(m=0), ValueError, r"m=0"),
        ("zoo", dict(h=-1.0), ValueError, r"h=-1.0"),
        ("sum_fusion", dict(estimator="magic"), ValueError, r"unknown estimator 'magic'"),
    ],
)
def test_get_method_rejects(name, options, error, message):
    with pytest.raises(error, match=message):
        get_method(name, **options)


def test_draw_directions_rejects():
    with pytest.raises(ValueError, match=r"m=0"):
        draw_directions(0, 4)
    with pytest.raises(TypeError, match=r"dim must be an integer"):
        draw_directions(3, 4.0)


def test_projector_with_the_wrong_output_shape_is_named():
    class Pool(nn.Module):
        def forward(self, x):
            return x.mean(0)

    with pytest.raises(ValueError, match=r"Pool mapped 1 token of width 12 to shape \(12,\)"):
        zo_sensitivity(Pool(), X)
