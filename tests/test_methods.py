"""The method registry: names from params.yaml resolve to the library's functions."""

import pytest
import torch

from conftest import NormMerger, make_features, make_mlp
from zoo_prune import GroupedProjector, available_methods, get_method, register_method, select_tokens, zo_sensitivity
from zoo_prune.methods import PruningMethod


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
    class FirstK(PruningMethod):
        def select(self, features, projected, k, *, projector):
            return torch.arange(k)

    assert "first_k_test" in available_methods()
    assert get_method("first_k_test").select(None, torch.zeros(5, 2), 3, projector=None).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="'first_k_test' is already registered"):
        register_method("first_k_test")(FirstK)
