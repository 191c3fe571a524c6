"""The method registry: names from params.yaml resolve to the library's functions."""

import pytest
import torch

from conftest import NormMerger, make_features, make_mlp
from zoo_prune import GroupedProjector, available_methods, get_method, register_method, select_tokens, zo_sensitivity
from zoo_prune.methods import ProjectorMethod, PruningMethod


def test_registered_names():
    assert {"zoo", "divprune", "sensitivity_only", "sum_fusion", "random"} <= set(available_methods())


@pytest.mark.parametrize("name, fusion", [("zoo", "multiply"), ("sum_fusion", "sum"), ("sensitivity_only", "sensitivity")])
def test_sensitivity_methods_compose_estimator_and_fusion(name, fusion):
    projector, features = make_mlp(dtype=torch.float32), make_features(dtype=torch.float32)
    projected = projector(features).detach()
    got = get_method(name, m=8, seed=3).select(features, projected, 5, projector=projector)
    s = zo_sensitivity(projector, features, m=8, seed=3, estimator="naive")
    assert got.tolist() == select_tokens(projected, 5, sensitivity=s, fusion=fusion).tolist()


def test_auto_estimator_is_fused_for_mlp_and_naive_otherwise():
    method = get_method("zoo")
    assert method.resolve_estimator(make_mlp()) == "fused"
    assert method.resolve_estimator(GroupedProjector(NormMerger(), group=4)) == "naive"


def test_zoo_runs_on_a_merger_projector():
    projector = GroupedProjector(NormMerger(), group=4)
    features = make_features(12, 24, dtype=torch.float32)
    picks = get_method("zoo", m=4).select(features, projector(features).detach(), 3, projector=projector)
    assert len(set(picks.tolist())) == 3


def test_divprune_and_random():
    z = torch.randn(30, 5)
    assert get_method("divprune").select(None, z, 4, projector=None).tolist() == select_tokens(z, 4, fusion="diversity").tolist()
    assert torch.equal(get_method("random", seed=9).select(None, z, 4, projector=None), select_tokens(z, 4, fusion="random", seed=9))


def test_register_a_new_method():
    @register_method("first_k_test")
    class FirstK(ProjectorMethod):
        def select(self, features, projected, k, *, projector):
            return torch.arange(k).expand(*projected.shape[:-2], k)  # (k,) or (B, k), as select promises

    assert "first_k_test" in available_methods()
    assert get_method("first_k_test").select(None, torch.zeros(5, 2), 3, projector=None).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="'first_k_test' is already registered"):
        register_method("first_k_test")(FirstK)
    with pytest.raises(ValueError, match="kind ''"):  # a method must be one of the three kinds
        register_method("kindless_test")(type("Kindless", (PruningMethod,), {}))


def test_pooling_grid_sizes_for_the_papers_and_the_testbeds_budgets():
    from zoo_prune.methods.pooling import pooled_grid

    assert [pooled_grid(24, 24, k) for k in (192, 128, 64)] == [(12, 16), (8, 16), (8, 8)]
    assert [pooled_grid(12, 12, k) for k in (48, 32, 16)] == [(6, 8), (4, 8), (4, 4)]
    assert pooled_grid(3, 7, 100) == (3, 7)  # never more cells than tokens
    assert pooled_grid(10, 10, 7) == (1, 7)  # 7 is prime: the most cells below the budget


def test_pooling_averages_each_cell_of_the_grid_hand_worked():
    z = torch.arange(16.0).view(1, 16, 1)  # a 4 x 4 grid, token i holds the value i
    tokens, index = get_method("pooling").reduce(None, z, 4, grid=(4, 4))
    assert tokens.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # mean of 0,1,4,5 / 2,3,6,7 / 8,9,12,13 / 10,11,14,15
    assert index.tolist() == [[0, 2, 8, 10]]  # each cell's centre (upper-left of the middle)
    z = torch.arange(9.0).view(1, 9, 1)  # 3 x 3 to 2 x 2: overlapping cells (rows 0-1 and 1-2)
    tokens, _ = get_method("pooling").reduce(None, z, 4, grid=(3, 3))
    assert tokens.flatten().tolist() == [2.0, 3.0, 5.0, 6.0]
    z2 = torch.randn(2, 16, 5)  # a batch pools each unit alone
    batched, _ = get_method("pooling").reduce(None, z2, 4, grid=(4, 4))
    for b in range(2):
        torch.testing.assert_close(batched[b], get_method("pooling").reduce(None, z2[b : b + 1], 4, grid=(4, 4))[0][0])
    with pytest.raises(ValueError, match=r"grid \(3, 3\) does not hold 16"):
        get_method("pooling").reduce(None, torch.zeros(1, 16, 2), 4, grid=(3, 3))


def test_registry_metadata_drives_the_stages():
    from zoo_prune import method_class

    assert method_class("zoo").params_section == "zoo" and method_class("random").params_section == "baselines"
    assert method_class("divprune").params_section is None
    assert {n for n in available_methods() if method_class(n).stochastic()} >= {"zoo", "random"}
    assert set(available_methods(kind="llm")) >= {"fastv"} and set(available_methods(kind="vision")) == {"visionzip"}
    assert set(available_methods(kind="projector")) >= {"zoo", "sum_fusion", "sensitivity_only", "divprune", "random", "pooling"}
    with pytest.raises(ValueError, match="'nope'"):
        available_methods(kind="nope")


def test_zo_sensitivity_and_the_methods_share_one_auto_estimator():
    """``estimator="auto"`` is resolved in one place: ``fused`` on an MLP (same values as ``naive``), ``naive`` elsewhere."""
    from zoo_prune.sensitivity import resolve_estimator

    projector, features = make_mlp(dtype=torch.float32), make_features(dtype=torch.float32)
    assert resolve_estimator(projector) == get_method("zoo").resolve_estimator(projector) == "fused"
    torch.testing.assert_close(zo_sensitivity(projector, features, m=8, seed=1),
                               zo_sensitivity(projector, features, m=8, seed=1, estimator="naive"), rtol=1e-4, atol=1e-6)
    assert resolve_estimator(GroupedProjector(NormMerger(), group=4)) == "naive"
