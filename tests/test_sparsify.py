"""Mask math on tiny tensors: exact counts, N:M, Wanda, SparseGPT, global scope, OWL, errors."""

import pytest
import torch

from lab_utils.core import sparsify as sp
from lab_utils.core.sparsify import SparsityError

torch.manual_seed(0)  # the tensors below are random but fixed


def quantized(rows, cols, seed=0):
    """Weights on a coarse grid, like 4-bit dequantized ones: many exact ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.round(torch.randn(rows, cols, generator=g) * 2) / 2 + 0.01


def correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * 0.5 + torch.eye(d)
    scale = torch.logspace(-1, 1, d)  # features of very different size, as in LLMs
    return (torch.randn(n, d, generator=g) @ mix) * scale


# --------------------------------------------------------------------------- exact sparsity
@pytest.mark.parametrize("s", [0.1, 0.37, 0.5, 0.9])
def test_row_scope_prunes_exactly_per_row(s):
    W = quantized(8, 30)
    W_mask = sp.magnitude_mask(W, s, scope="row")
    assert W_mask.sum(dim=1).tolist() == [int(30 * s)] * 8
    # and it removes the smallest: every pruned |w| <= every kept |w| of its row
    for r in range(8):
        assert W[r].abs()[W_mask[r]].max() <= W[r].abs()[~W_mask[r]].min()


@pytest.mark.parametrize("s", [0.25, 0.5, 0.73])
def test_layer_scope_is_exact_despite_ties(s):
    W = quantized(16, 24)
    assert (W.abs() == W.abs().flatten().kthvalue(int(W.numel() * s)).values).sum() > 1  # ties exist
    W_mask = sp.magnitude_mask(W, s, scope="layer")
    assert int(W_mask.sum()) == int(W.numel() * s)
    assert W.abs()[W_mask].max() <= W.abs()[~W_mask].min()


def test_random_mask_is_exact_seeded_and_not_magnitude():
    W = torch.randn(32, 64)
    a = sp.random_mask(W, 0.5, scope="row", seed=1)
    assert a.sum(dim=1).tolist() == [32] * 32
    assert torch.equal(a, sp.random_mask(W, 0.5, scope="row", seed=1))
    assert not torch.equal(a, sp.random_mask(W, 0.5, scope="row", seed=2))
    assert not torch.equal(a, sp.magnitude_mask(W, 0.5, scope="row"))


# --------------------------------------------------------------------------- N:M
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3)])
def test_nm_masks_hold_exactly_n_of_every_m(n, m):
    W = torch.randn(12, 48)
    X = correlated_inputs(256, 48)
    masks = {
        "magnitude": sp.magnitude_mask(W, 0.5, n, m),
        "random": sp.random_mask(W, 0.5, n, m),
        "wanda": sp.wanda_mask(W, (X ** 2).sum(0), 0.5, n, m),
        "sparsegpt": sp.sparsegpt_prune(W, sp.hessian(X), 0.5, n, m)[1],
    }
    for name, W_mask in masks.items():
        groups = W_mask.view(12, -1, m).sum(dim=2)
        assert (groups == n).all(), name
        assert sp.nm_violations(W.masked_fill(W_mask, 0), n, m) == 0, name


def test_nm_verification_catches_a_violation():
    W = torch.randn(4, 16)
    W.masked_fill_(sp.magnitude_mask(W, 0.5, 2, 4), 0)
    assert sp.nm_violations(W, 2, 4) == 0
    W[1, 4:8] = 1.0  # one group fully dense
    assert sp.nm_violations(W, 2, 4) == 1


def test_nm_mask_with_a_short_last_group():
    W_mask = sp.nm_mask(torch.arange(10.0).repeat(2, 1), 2, 4)  # groups of 4, 4, 2
    assert W_mask[0].tolist() == [True, True, False, False] * 2 + [True, True]


def test_nm_picks_the_lowest_in_each_group():
    W = torch.tensor([[0.1, -5.0, 0.3, 2.0, 9.0, -0.2, 0.05, 1.0]])
    assert sp.magnitude_mask(W, 0.5, 2, 4).tolist() == [[True, False, True, False,
                                                         False, True, True, False]]


# --------------------------------------------------------------------------- Wanda
@pytest.mark.parametrize("pattern", [(0, 0), (2, 4)])
def test_wanda_equals_row_magnitude_when_input_norms_are_equal(pattern):
    W = torch.randn(16, 32)
    same = sp.wanda_mask(W, torch.full((32,), 3.7), 0.5, *pattern)
    assert torch.equal(same, sp.magnitude_mask(W, 0.5, *pattern, scope="row"))
    # with unequal norms the masks differ: the test above can fail
    norms = torch.logspace(-2, 2, 32)
    assert not torch.equal(sp.wanda_mask(W, norms, 0.5, *pattern), same)


def test_wanda_keeps_small_weights_on_large_inputs():
    W = torch.tensor([[1.0, 0.1]])
    assert sp.wanda_mask(W, torch.tensor([1.0, 10_000.0]), 0.5).tolist() == [[True, False]]


def test_wanda_rejects_mismatched_norms():
    with pytest.raises(SparsityError, match="input norms"):
        sp.wanda_mask(torch.randn(4, 8), torch.ones(7), 0.5)


# --------------------------------------------------------------------------- SparseGPT
@pytest.mark.parametrize("pattern", [(0, 0), (2, 4)])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    X = correlated_inputs(2048, 64)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    err = {}
    W_new, W_mask = sp.sparsegpt_prune(W, sp.hessian(X), 0.5, *pattern)
    err["sparsegpt"] = torch.linalg.norm(X @ (W - W_new).T)
    for name, mask in (("wanda", sp.wanda_mask(W, (X ** 2).sum(0), 0.5, *pattern)),
                       ("magnitude", sp.magnitude_mask(W, 0.5, *pattern, scope="row"))):
        err[name] = torch.linalg.norm(X @ (W - W.masked_fill(mask, 0)).T)
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"]
    assert torch.equal(W_new == 0, W_mask)


def test_sparsegpt_exact_count_per_layer():
    X = correlated_inputs(512, 300)  # 300 columns: blocks of 128, 128, 44
    W = torch.randn(20, 300)
    for s in (0.3, 0.5, 0.8):
        _, W_mask = sp.sparsegpt_prune(W, sp.hessian(X), s)
        assert int(W_mask.sum()) == int(W.numel() * s)


def naive_sparsegpt_nm(W, H, prune_n, prune_m, percdamp=0.01):
    """SparseGPT written out plainly from the paper: one column at a time, the
    full inverse-Hessian row for every update, no blocks."""
    W = W.clone().double()
    H = H.clone().double()
    H += percdamp * H.diag().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i in range(W.shape[1]):
        if i % prune_m == 0:
            score = W[:, i:i + prune_m] ** 2 / U.diag()[i:i + prune_m] ** 2
            idx = torch.topk(score, prune_n, dim=1, largest=False)[1]
            mask[:, i:i + prune_m].scatter_(1, idx, True)
        err = torch.where(mask[:, i], W[:, i], 0.0) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
        W[mask[:, i], i] = 0
    return W.float(), mask


def test_sparsegpt_lazy_blocks_match_the_plain_algorithm():
    X = correlated_inputs(1024, 160)
    W = torch.randn(24, 160)
    H = sp.hessian(X)
    W_new, W_mask = sp.sparsegpt_prune(W, H, 0.5, 2, 4, blocksize=64)
    W_ref, mask_ref = naive_sparsegpt_nm(W, H, 2, 4)
    assert torch.equal(W_mask, mask_ref)
    assert torch.allclose(W_new, W_ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("pattern", [(0, 0), (2, 4)])
def test_sparsegpt_with_a_shared_inverse_equals_its_own(pattern):
    """Layers that read one input share one inverse Hessian: the result is bit for bit the same."""
    X = correlated_inputs(512, 64)
    X[:, 3] = 0
    H = sp.hessian(X)
    inverse = sp.sparsegpt_inverse(H)
    for seed in (0, 1):
        W = torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))
        own = sp.sparsegpt_prune(W, H, 0.5, *pattern)
        shared = sp.sparsegpt_prune(W, None, 0.5, *pattern, inverse=inverse)
        assert torch.equal(own[0], shared[0]) and torch.equal(own[1], shared[1])
    with pytest.raises(SparsityError, match="inverse Hessian"):
        sp.sparsegpt_prune(torch.randn(16, 32), None, 0.5, inverse=inverse)


def test_sparsegpt_prunes_dead_inputs_and_survives_a_singular_hessian():
    X = correlated_inputs(256, 32)
    X[:, 5] = 0  # an input that is never active
    W = torch.randn(8, 32)
    W_new, W_mask = sp.sparsegpt_prune(W, sp.hessian(X), 0.25)
    assert W_mask[:, 5].all() and (W_new[:, 5] == 0).all()
    low_rank = torch.randn(4, 32)  # 4 tokens: H has rank 4 of 32
    W_new, _ = sp.sparsegpt_prune(W, sp.hessian(low_rank), 0.5)
    assert torch.isfinite(W_new).all()


# --------------------------------------------------------------------------- global scope
def test_global_scope_reaches_the_global_target_across_layers():
    layers = [torch.randn(8, 16) * 0.1, torch.randn(16, 8), quantized(8, 8) * 10]
    for s in (0.3, 0.5, 0.9):
        masks = sp.global_masks([W.abs() for W in layers], s)
        total = sum(W.numel() for W in layers)
        assert sum(int(m.sum()) for m in masks) == int(total * s)
        per_layer = [float(m.float().mean()) for m in masks]
        assert per_layer[0] > per_layer[2]  # the small-weight layer loses more
    t, ties = sp.global_threshold([W.abs() for W in layers], 0.5)
    assert ties >= 1 and t > 0


# --------------------------------------------------------------------------- OWL
def test_owl_allocation_preserves_the_mean_and_spares_outlier_layers():
    ratios = [0.010, 0.030, 0.002, 0.020]
    s = sp.owl_sparsities(ratios, 0.6, lam=0.08)
    assert sum(s) / len(s) == pytest.approx(0.6, abs=1e-12)
    assert s[1] == min(s) and s[2] == max(s)  # more outliers -> pruned less
    assert max(s) - min(s) == pytest.approx(0.16)
    assert sp.owl_sparsities([0.01] * 3, 0.5) == [0.5] * 3
    small = sp.owl_sparsities(ratios, 0.05, lam=0.08)  # lambda bounded so no layer goes < 0
    assert min(small) >= 0 and sum(small) / 4 == pytest.approx(0.05)


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = torch.ones(100)
    scores[:3] = 50.0  # mean = 2.47 -> threshold 12.35 at M = 5
    assert sp.outlier_ratio([scores[:50], scores[50:]], hyper_m=5) == pytest.approx(0.03)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "half", None])
def test_sparsity_outside_unit_interval_is_a_clear_error(bad):
    with pytest.raises(SparsityError, match=r"\[0, 1\)|number"):
        sp.check_sparsity_ratio(bad)


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "2-4", "2:"])
def test_bad_nm_pattern_is_a_clear_error(bad):
    with pytest.raises(SparsityError, match="N:M|pattern"):
        sp.parse_pattern(bad)


def test_unknown_method_and_scope_are_clear_errors():
    with pytest.raises(SparsityError, match="choose one of random, magnitude, wanda, sparsegpt"):
        sp.check_method("obs")
    with pytest.raises(SparsityError, match="scope"):
        sp.magnitude_mask(torch.randn(2, 4), 0.5, scope="block")


@pytest.mark.parametrize("make", [lambda: torch.randn(24, 40), lambda: quantized(24, 40, seed=4),
                                  lambda: torch.zeros(24, 40)])  # every score tied
@pytest.mark.parametrize("s", [0.2, 0.5, 0.85])
def test_selection_masks_equal_a_stable_sort(make, s):
    """Row masks and the layer selection (kthvalue + ties in index order) equal a stable sort."""
    metric = make().abs()
    k_row, k_all = int(40 * s), int(metric.numel() * s)
    by_sort = torch.zeros_like(metric, dtype=torch.bool)
    by_sort.scatter_(1, torch.sort(metric, dim=1, stable=True)[1][:, :k_row], True)
    assert torch.equal(sp.row_mask(metric, s), by_sort)
    flat = torch.zeros(metric.numel(), dtype=torch.bool)
    flat[torch.sort(metric.flatten(), stable=True)[1][:k_all]] = True
    assert torch.equal(sp.layer_mask(metric, s), flat.view_as(metric))


@pytest.mark.parametrize("cols", [3, 8, 9, 64, 97])
def test_gram_from_the_upper_blocks_equals_the_full_product(cols):
    X = torch.randn(200, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(cols))
    G = sp.gram(X)
    # below the diagonal blocks, G holds exact copies of the blocks above; a diagonal block is
    # one BLAS product, symmetric or not to the last bit depending on the CPU's kernel
    edges = [cols * i // 4 for i in range(5)] if cols >= 8 else [0, cols]
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        assert torch.equal(G[b:, a:b], G[a:b, b:].T)
    assert torch.allclose(G, X.T @ X, rtol=1e-12, atol=1e-12)
