"""select_tokens against a hand-worked case, plain-loop references and DivPrune's official rule."""

import math

import pytest
import torch

import zoo_prune.selection as selection
from zoo_prune import normalize_sensitivity, select_tokens

# Five unit vectors at these angles: every cosine is cos(difference of angles).
ANGLES = [0, 90, 180, 60, 30]
HAND_Z = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in ANGLES], dtype=torch.float64)
HAND_S = torch.tensor([0.2, 1.0, 0.0, 0.6, 0.8], dtype=torch.float64)  # already min-max normalised


@pytest.mark.parametrize(
    "fusion, expected",
    [
        # multiply: 1 (S^=1); then S^*Div: t0 .2*1, t3 .6*.134, t4 .8*.5 -> 4; then t0 .2*.134, t3 .6*.134 -> 3; then 0.
        ("multiply", [1, 4, 3, 0]),
        # sum: 1; then S^+Div: t0 1.2, t2 1.0, t3 .734, t4 1.3 -> 4; t0 .334, t2 1.0, t3 .734 -> 2; then 3.
        ("sum", [1, 4, 2, 3]),
        ("sensitivity", [1, 4, 3, 0]),
        # DivPrune: nearest-neighbour distances .134, .134, 1 (t2), .134, .134 -> 2; then farthest from {2}: t0
        # (distance 2); then min distance to {2, 0}: t1 1, t3 .5, t4 .134 -> 1 (t3 and t4 would tie next).
        ("diversity", [2, 0, 1]),
    ],
)
def test_hand_worked_five_tokens(fusion, expected):
    assert select_tokens(HAND_Z, len(expected), sensitivity=HAND_S, fusion=fusion).tolist() == expected


def loop_greedy(z, s, k, fusion):
    """Algorithm 1 (multiply / sum) and DivPrune, with Python lists and loops, float64."""
    z = z.tolist()
    n = len(z)
    norm = [math.sqrt(sum(v * v for v in row)) for row in z]
    cos = [[sum(a * b for a, b in zip(z[i], z[j])) / (norm[i] * norm[j]) for j in range(n)] for i in range(n)]
    if fusion == "diversity":
        first = max(range(n), key=lambda i: (min(1 - cos[i][j] for j in range(n) if j != i), -i))
    else:
        lo, hi = min(s), max(s)
        s_hat = [1.0] * n if hi == lo else [(v - lo) / (hi - lo) for v in s]
        first = max(range(n), key=lambda i: (s_hat[i], -i))
    picked = [first]
    while len(picked) < k:
        best, best_score = None, -math.inf
        for i in range(n):
            if i in picked:
                continue
            div = 1 - max(cos[i][j] for j in picked)
            score = div if fusion == "diversity" else (s_hat[i] * div if fusion == "multiply" else s_hat[i] + div)
            if score > best_score:
                best, best_score = i, score
        picked.append(best)
    return picked


@pytest.mark.parametrize("fusion", ["multiply", "sum", "diversity"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_plain_loop_reference(fusion, seed):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    s = torch.rand(40, generator=generator, dtype=torch.float64) * 5 + 2
    got = select_tokens(z, 15, sensitivity=s, fusion=fusion).tolist()
    assert got == loop_greedy(z, s.tolist(), 15, fusion)


def divprune_official(features, k):
    """DivPrune's published selection rule (Alvar et al., CVPR 2025), transcribed: distance
    1 - cos; first pick by the second-smallest entry of each column (its nearest neighbour),
    later picks by the argmax of the minimum distance to the chosen rows."""
    normed = features / features.norm(dim=1, keepdim=True)
    distance = 1.0 - normed @ normed.t()
    picks = torch.empty(k, dtype=torch.long)
    for i in range(k):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(distance[picks[:i]], dim=0).values
        picks[i] = torch.argmax(scores)
    return picks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, k", [(64, 8), (576, 64), (300, 300)])
def test_diversity_reproduces_divprune(dtype, n, k):
    z = torch.randn(n, 32, generator=torch.Generator().manual_seed(n), dtype=dtype)
    assert select_tokens(z, k, fusion="diversity").tolist() == divprune_official(z, k).tolist()


def test_nearest_neighbour_blocks_agree_with_one_block(monkeypatch):
    z = torch.randn(2, 200, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = select_tokens(z, 30, fusion="diversity")
    monkeypatch.setattr(selection, "_BLOCK_ELEMENTS", 1000)  # 2 x 2 rows x 200 per block
    assert torch.equal(select_tokens(z, 30, fusion="diversity"), whole)
    assert whole[0].tolist() == divprune_official(z[0], 30).tolist()


@pytest.mark.parametrize("fusion", ["multiply", "sum", "diversity", "sensitivity", "random"])
def test_no_index_repeats_when_scores_tie_at_zero(fusion):
    z = torch.ones(6, 3)  # identical tokens: Div = 0 after the first pick
    s = torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0, 0.0])
    picks = select_tokens(z, 6, sensitivity=s, fusion=fusion, seed=0).tolist()
    assert sorted(picks) == list(range(6))
    if fusion != "random":  # ties go to the lowest index
        assert picks == ([0, 1, 2, 3, 4, 5] if fusion == "diversity" else [2, 0, 1, 3, 4, 5])


def test_flat_sensitivity_normalises_to_one():
    assert torch.equal(normalize_sensitivity(torch.full((2, 4), 3.0)), torch.ones(2, 4))
    torch.testing.assert_close(normalize_sensitivity(torch.tensor([1.0, 3.0, 2.0])), torch.tensor([0.0, 1.0, 0.5]))


@pytest.mark.parametrize("fusion", ["multiply", "sum", "diversity", "sensitivity", "random"])
def test_batch_equals_one_row_at_a_time(fusion):
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3, 50, 8, generator=generator)
    s = torch.rand(3, 50, generator=generator)
    batch = select_tokens(z, 10, sensitivity=s, fusion=fusion, seed=4)
    assert batch.shape == (3, 10)
    for b in range(3):
        assert torch.equal(batch[b], select_tokens(z[b], 10, sensitivity=s[b], fusion=fusion, seed=4))


def test_sensitivity_only_is_descending_sensitivity():
    s = torch.tensor([0.3, 0.9, 0.1, 0.9, 0.5])
    assert select_tokens(torch.randn(5, 4), 4, sensitivity=s, fusion="sensitivity").tolist() == [1, 3, 4, 0]


def test_random_is_seeded_and_distinct():
    z = torch.randn(100, 4)
    first = select_tokens(z, 30, fusion="random", seed=1)
    assert torch.equal(first, select_tokens(z, 30, fusion="random", seed=1))
    assert not torch.equal(first, select_tokens(z, 30, fusion="random", seed=2))
    assert len(set(first.tolist())) == 30 and 0 <= first.min() and first.max() < 100
    counts = torch.zeros(100)
    for seed in range(300):
        counts[select_tokens(z, 30, fusion="random", seed=seed)] += 1
    assert counts.min() > 40 and counts.max() < 140  # each token kept ~90 times of 300


def test_keep_all_returns_a_permutation():
    z = torch.randn(12, 4)
    for fusion in ["multiply", "sum", "diversity"]:
        assert sorted(select_tokens(z, 12, sensitivity=torch.rand(12), fusion=fusion).tolist()) == list(range(12))
