"""Small projectors and features shared by the tests (real shapes live in benchmarks/)."""

import pytest
import torch
from torch import nn


def make_mlp(d_v=12, d_h=24, d_l=16, *, seed=0, dtype=torch.float64, act=None, bias=True):
    """M = Linear-act-Linear (LLaVA's projector form) with weights scaled so GELU is curved."""
    generator = torch.Generator().manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(d_v, d_h, bias=bias), act or nn.GELU(), nn.Linear(d_h, d_l, bias=bias))
    with torch.no_grad():
        for layer in (mlp[0], mlp[2]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / layer.in_features**0.5)
            if bias:
                layer.bias.copy_(0.3 * torch.randn(layer.bias.shape, generator=generator))
    return mlp.to(dtype)


class NormMerger(nn.Module):
    """A Qwen2.5-VL-style merger: LayerNorm per patch, then an MLP over groups of 4 patches."""

    def __init__(self, patch_dim=6, out_dim=10, seed=0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.ln_q = nn.LayerNorm(patch_dim)
            self.mlp = nn.Sequential(nn.Linear(4 * patch_dim, 4 * patch_dim), nn.GELU(), nn.Linear(4 * patch_dim, out_dim))
            nn.init.normal_(self.ln_q.weight, 1.0, 0.2)

    def forward(self, patches):
        return self.mlp(self.ln_q(patches).view(-1, 4 * self.ln_q.normalized_shape[0]))


def make_features(n=20, d_v=12, *, seed=1, dtype=torch.float64, batch=None):
    """Tokens with different scales, so their sensitivities differ clearly."""
    generator = torch.Generator().manual_seed(seed)
    shape = (n, d_v) if batch is None else (batch, n, d_v)
    scale = torch.linspace(0.2, 3.0, n)[:, None]
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


@pytest.fixture
def mlp64():
    return make_mlp()


@pytest.fixture
def features64():
    return make_features()


@pytest.fixture(scope="session")
def paper_standins(tmp_path_factory):
    """The paper's four stand-in checkpoints and nine stand-in tasks, built once per test session (~20 s)."""
    from pipeline_helpers import build_paper_standins

    return build_paper_standins(tmp_path_factory.mktemp("paper-standins"))
