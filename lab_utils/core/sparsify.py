"""Sparsity masks: small pure functions on one weight (out x in) and its statistics.

Nothing here touches a model: the driver that collects statistics and applies
masks block by block lives in :mod:`lab_utils.engine.prune`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch.profiler import record_function

from lab_utils.core.measure import num_threads

METHODS = ("random", "magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")  # methods that need calibration data
SCOPES = ("row", "layer", "global")
UNSTRUCTURED = "unstructured"


class SparsityError(ValueError):
    """Bad pruning input, reported in one line that names the fix."""


def check_sparsity_ratio(sparsity_ratio) -> float:
    """A sparsity ratio is the fraction of weights set to zero, in [0, 1)."""
    try:
        s = float(sparsity_ratio)
    except (TypeError, ValueError):
        raise SparsityError(f"sparsity {sparsity_ratio!r} is not a number; use a fraction in [0, 1), "
                            f"e.g. 0.5") from None
    if not 0.0 <= s < 1.0:
        raise SparsityError(f"sparsity {sparsity_ratio!r} is outside [0, 1): it is the fraction of "
                            f"weights set to zero, e.g. 0.5 for half")
    return s


def parse_pattern(pattern) -> tuple[int, int]:
    """``"unstructured"`` -> (0, 0); ``"2:4"`` -> (2, 4): N zeros in every M
    consecutive weights of a row (the pattern sparse tensor cores accelerate)."""
    if pattern in (None, "", UNSTRUCTURED):
        return 0, 0
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m:
        raise SparsityError(f"pattern {pattern!r} is not 'unstructured' or 'N:M' (e.g. '2:4')")
    prune_n, prune_m = int(m.group(1)), int(m.group(2))
    if not 0 < prune_n < prune_m:
        raise SparsityError(f"pattern {pattern!r}: N:M needs 0 < N < M (N of every M weights are "
                            f"zeroed), e.g. '2:4' or '4:8'")
    return prune_n, prune_m


def pattern_name(prune_n: int, prune_m: int) -> str:
    return UNSTRUCTURED if prune_n == 0 else f"{prune_n}:{prune_m}"


def check_method(method: str) -> str:
    if method not in METHODS:
        raise SparsityError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise SparsityError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    return scope


# --------------------------------------------------------------------------- selecting weights
def prune_count(numel: int, sparsity_ratio: float) -> int:
    """How many of ``numel`` weights a ratio removes: ``int(numel * ratio)``,
    the rounding the Wanda and SparseGPT reference code uses."""
    return int(numel * sparsity_ratio)


def row_mask(W_metric: torch.Tensor, sparsity_ratio: float) -> torch.Tensor:
    """Prune the ``int(in * ratio)`` lowest scores of every output row.

    The mask a stable sort of each row would give (the Wanda reference code
    sorts): every score below the row's k-th smallest, plus the first ties
    at it in column order, so quantized weights (many equal values) still
    lose exactly the requested count per row. The k-th smallest comes from a
    selection (``kthvalue``), several times faster than sorting the row.
    """
    k = prune_count(W_metric.shape[1], sparsity_ratio)
    if not k:
        return torch.zeros(W_metric.shape, dtype=torch.bool, device=W_metric.device)
    t = torch.kthvalue(W_metric, k, dim=1, keepdim=True).values
    W_mask = W_metric < t
    ties = W_metric == t
    need = k - W_mask.sum(dim=1, keepdim=True)  # >= 1: the k-th value itself ties
    W_mask |= ties & (ties.cumsum(dim=1) <= need)
    return W_mask


def layer_mask(W_metric: torch.Tensor, sparsity_ratio: float) -> torch.Tensor:
    """Prune the ``int(numel * ratio)`` lowest scores of the whole matrix.

    Exact count, unlike ``W_metric <= threshold``, which over-prunes when many
    scores tie at the threshold (as they do for 4-bit quantized weights); ties
    go in row-major order, as a stable sort would order them, but the
    threshold comes from a selection (``kthvalue``), twice as fast as a sort.
    """
    return global_masks([W_metric], sparsity_ratio)[0]


def nm_mask(W_metric: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    """N:M: in every group of M consecutive weights of a row, prune the N
    lowest scores. Vectorized over all groups at once; a last group shorter
    than M (width not a multiple of M) loses min(N, its length) weights."""
    rows, cols = W_metric.shape
    pad = (-cols) % prune_m
    metric = W_metric.float().contiguous()
    if pad:  # padded slots score +inf: they are chosen only if the group is short
        metric = torch.cat([metric, metric.new_full((rows, pad), float("inf"))], dim=1)
    groups = metric.view(rows, -1, prune_m)
    idx = torch.topk(groups, prune_n, dim=2, largest=False)[1]
    W_mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return W_mask.view(rows, -1)[:, :cols].contiguous()


def select_mask(W_metric: torch.Tensor, sparsity_ratio: float, prune_n: int = 0,
                prune_m: int = 0, scope: str = "row") -> torch.Tensor:
    """The mask (True = pruned) that removes the lowest scores, for a pattern
    and a scope (``row`` or ``layer``; ``global`` needs every layer, see
    :func:`global_masks`)."""
    if prune_n:
        return nm_mask(W_metric, prune_n, prune_m)
    if scope == "row":
        return row_mask(W_metric, sparsity_ratio)
    if scope == "layer":
        return layer_mask(W_metric, sparsity_ratio)
    if scope == "global":
        raise SparsityError("scope 'global' ranks weights across all layers: use global_masks() "
                            "or pruned_model(..., scope='global')")
    raise SparsityError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")


def global_threshold(W_metrics: Sequence[torch.Tensor], sparsity_ratio: float) -> tuple[float, int]:
    """One threshold across layers: (t, ties) such that pruning every score
    below t, plus the first ``ties`` scores equal to t (layer order, then
    row-major), removes exactly ``int(total * ratio)`` weights."""
    total = sum(m.numel() for m in W_metrics)
    k = prune_count(total, sparsity_ratio)
    if k == 0:
        return float("-inf"), 0
    flat = torch.cat([m.detach().flatten().float() for m in W_metrics])
    t = flat.kthvalue(k).values.item()
    below = int((flat < t).sum())
    return t, k - below


def global_masks(W_metrics: Sequence[torch.Tensor], sparsity_ratio: float) -> list[torch.Tensor]:
    """Masks for several layers ranked together (``scope='global'``)."""
    t, ties = global_threshold(W_metrics, sparsity_ratio)
    masks = []
    for m in W_metrics:
        W_mask = torch.lt(m, t).contiguous()
        if ties > 0:
            eq = (m == t).flatten().nonzero().flatten()[:ties]
            W_mask.view(-1)[eq] = True
            ties -= eq.numel()
        masks.append(W_mask)
    return masks


# --------------------------------------------------------------------------- the methods
def random_mask(W: torch.Tensor, sparsity_ratio: float, prune_n: int = 0, prune_m: int = 0,
                scope: str = "layer", seed: int = 0) -> torch.Tensor:
    """A baseline: the same selection rules applied to uniform random scores."""
    g = torch.Generator().manual_seed(seed)
    return select_mask(torch.rand(W.shape, generator=g), sparsity_ratio, prune_n, prune_m, scope)


def magnitude_mask(W: torch.Tensor, sparsity_ratio: float, prune_n: int = 0, prune_m: int = 0,
                   scope: str = "row") -> torch.Tensor:
    """Prune the smallest |W| per output row or per layer."""
    return select_mask(W.abs(), sparsity_ratio, prune_n, prune_m, scope)


def wanda_metric(W: torch.Tensor, act_norm_sq: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2: a weight matters as much as the inputs it multiplies."""
    return W.abs().float() * act_norm_sq.float().clamp_min(0).sqrt().reshape(1, -1)


def wanda_mask(W: torch.Tensor, act_norm_sq: torch.Tensor, sparsity_ratio: float,
               prune_n: int = 0, prune_m: int = 0, scope: str = "row") -> torch.Tensor:
    """Wanda (Sun et al. 2023): ``act_norm_sq[j]`` is the squared L2 norm of
    input feature j over the calibration tokens (any common scale). The
    comparison group is each output row, as in the paper."""
    if act_norm_sq.numel() != W.shape[1]:
        raise SparsityError(f"wanda: {act_norm_sq.numel()} input norms for a weight with "
                            f"{W.shape[1]} inputs")
    return select_mask(wanda_metric(W, act_norm_sq), sparsity_ratio, prune_n, prune_m, scope)


def hessian(X: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n for inputs X (n tokens x in): SparseGPT's layer-wise
    Hessian of ||WX - W'X||^2."""
    X = X.reshape(-1, X.shape[-1]).float()
    return 2.0 * X.T @ X / max(1, X.shape[0])


def gram(X: torch.Tensor, parts: int = 4) -> torch.Tensor:
    """X^T X (in x in) for X (n x in), from the blocks on and above its diagonal only:
    the matrix is symmetric, so with ``parts`` column blocks the products cost
    (parts + 1) / (2 parts) of the full one (5/8 for 4), and the blocks below the
    diagonal are copies. Below 2 * parts columns it is one product."""
    cols = X.shape[1]
    if parts < 2 or cols < 2 * parts:
        return X.T @ X
    edges = [cols * i // parts for i in range(parts + 1)]
    G = X.new_empty((cols, cols))
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        upper = X[:, a:b].T @ X[:, a:]  # rows a:b, columns a: (the diagonal block and right of it)
        G[a:b, a:] = upper
        G[b:, a:b] = upper[:, b - a:].T
    return G


def _block_counts(rows: int, cols: int, blocksize: int, sparsity_ratio: float) -> list[int]:
    """Weights to prune per column block so the layer total is exactly
    ``int(numel * ratio)`` (cumulative rounding)."""
    out, done = [], 0
    for i2 in range(blocksize, cols + blocksize, blocksize):
        upto = prune_count(rows * min(i2, cols), sparsity_ratio)
        out.append(upto - done)
        done = upto
    return out


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian."""
    diag = torch.arange(H.shape[0], device=H.device)
    damp = percdamp * torch.mean(torch.diag(H))
    for attempt in range(4):  # an ill-conditioned H gets more damping, not a crash
        Hd = H.clone()
        Hd[diag, diag] += damp * (10 ** attempt)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
    raise SparsityError("sparsegpt: the Hessian is not positive definite even after damping; "
                        "use more calibration samples (nsamples)")


def _sub_block(prune_m: int, size: int = 16) -> int:
    """Columns updated eagerly inside a block (a multiple of M, so an N:M
    group never straddles two of them)."""
    m = max(1, prune_m)
    return m * max(1, size // m)


@torch.no_grad()
def sparsegpt_inverse(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """What SparseGPT needs from a Hessian, computed once however many layers
    read the same input (q/k/v, gate/up): the upper Cholesky factor U of the
    dampened inverse of ``H``, and the inputs that were always zero (``dead``,
    pruned for free; their diagonal set to 1 so H stays invertible)."""
    H = H.detach().to(torch.float32, copy=True).contiguous()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    with record_function("lab::sparsegpt_inverse"):
        return _inverse_cholesky(H, percdamp), dead


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor | None, sparsity_ratio: float, prune_n: int = 0,
                    prune_m: int = 0, blocksize: int = 128, percdamp: float = 0.01, *,
                    inverse: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023) on one weight: returns (new W, W_mask).

    ``H`` is the layer Hessian 2XX^T/n (any positive scale). It is dampened by
    ``percdamp`` of its mean diagonal and inverted through Cholesky; the upper
    Cholesky factor U of H^-1 drives the optimal-brain-surgeon updates
    (``inverse``: the result of :func:`sparsegpt_inverse` for ``H`` when the
    caller already has it; ``H`` may then be None). Columns are processed left
    to right in blocks of ``blocksize``: a block's mask is chosen from
    w^2 / U_jj^2 (for N:M, per group of M columns when the group is reached,
    from the already updated weights); each pruned weight's error
    err = w / U_jj is spread over the columns after it (w_k -= err * U_jk).

    The arithmetic is the reference algorithm's; the order of the updates is
    lazier (as GPTQ does it): eager rank-1 updates only inside a sub-block of
    16 columns, one matrix product for the rest of the block, another for the
    columns after the block. Work happens on W transposed (in x out), so each
    update touches contiguous rows.
    """
    rows, cols = W.shape
    if inverse is None:
        if H is None or H.shape != (cols, cols):
            shape = None if H is None else tuple(H.shape)
            raise SparsityError(f"sparsegpt: Hessian {shape} does not match {cols} inputs")
        inverse = sparsegpt_inverse(H, percdamp)
    Hinv, dead = inverse
    if Hinv.shape != (cols, cols):
        raise SparsityError(f"sparsegpt: inverse Hessian {tuple(Hinv.shape)} does not match {cols} inputs")
    Wt = W.detach().t().to(torch.float32, copy=True).contiguous()  # in x out
    Wt[dead] = 0
    Mt = torch.zeros((cols, rows), dtype=torch.bool, device=W.device)
    counts = _block_counts(rows, cols, blocksize, sparsity_ratio)
    step = _sub_block(prune_m if prune_n else 1)

    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        Wb, Mb, U = Wt[i1:i2], Mt[i1:i2], Hinv[i1:i2, i1:i2]
        d = torch.diag(U)
        Eb = torch.zeros_like(Wb)
        if prune_n == 0 and counts[b]:
            # rank w^2 / U_jj^2 over the block, row-major in W as the reference does
            score = (Wb ** 2 / d.reshape(-1, 1) ** 2).t().flatten()
            pick = torch.topk(score, counts[b], largest=False, sorted=False)[1]
            r, j = pick // (i2 - i1), pick % (i2 - i1)
            Mb[j, r] = True
        # rank-1 updates a few hundred wide: a second core's fan-out costs more than it saves;
        # the matrix products after the block (below) use every thread
        with num_threads(1):
            _sparsegpt_block(Wb, Mb, Eb, U, d, step, prune_n, prune_m)
        if i2 < cols:
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Eb, alpha=-1)
    Mt |= dead.reshape(-1, 1)
    Wt.masked_fill_(Mt, 0)
    return Wt.t().contiguous(), Mt.t().contiguous()


def _sparsegpt_block(Wb: torch.Tensor, Mb: torch.Tensor, Eb: torch.Tensor, U: torch.Tensor, d: torch.Tensor,
                     step: int, prune_n: int, prune_m: int) -> None:
    """One block of columns of :func:`sparsegpt_prune`, in place: the eager
    updates inside each sub-block of ``step`` columns, a product for the rest
    of the block; ``Eb`` receives the errors that the caller spreads further."""
    width = Wb.shape[0]
    for j1 in range(0, width, step):
        j2 = min(j1 + step, width)
        factor = Mb[j1:j2].float() / d[j1:j2].reshape(-1, 1)  # err = w * m / U_jj
        w_rows, e_rows, f_rows = Wb[j1:j2].unbind(0), Eb[j1:j2].unbind(0), factor.unbind(0)
        for k in range(j2 - j1):
            if prune_n and k % prune_m == 0:  # the group's mask, from updated weights
                g, h = j1 + k, min(j1 + k + prune_m, j2)
                score = Wb[g:h] ** 2 / d[g:h].reshape(-1, 1) ** 2
                Mb[g:h] = nm_mask(score.t(), prune_n, prune_m).t()
                factor[k:k + h - g] = Mb[g:h].float() / d[g:h].reshape(-1, 1)
            err = torch.mul(w_rows[k], f_rows[k], out=e_rows[k])
            if k + 1 < j2 - j1:
                Wb[j1 + k + 1:j2].addr_(U[j1 + k, j1 + k + 1:j2], err, alpha=-1)
        Wb[j1:j2].masked_fill_(Mb[j1:j2], 0)
        if j2 < width:
            Wb[j2:].addmm_(U[j1:j2, j2:].t(), Eb[j1:j2], alpha=-1)


def apply_mask(W: torch.Tensor, W_mask: torch.Tensor) -> torch.Tensor:
    """A copy of W with the masked weights set to zero."""
    return W.masked_fill(W_mask, 0)


# --------------------------------------------------------------------------- OWL
def outlier_ratio(W_metrics: Sequence[torch.Tensor], hyper_m: float = 5.0) -> float:
    """Fraction of scores above ``hyper_m`` times their mean, over the
    concatenated Wanda scores |W| * ||X|| of one transformer block (OWL's
    layerwise outlier distribution, Yin et al. 2023)."""
    flat = torch.cat([m.detach().flatten().float() for m in W_metrics])
    return float((flat > flat.mean() * hyper_m).float().mean())


def owl_sparsities(outlier_ratios: Sequence[float], sparsity_ratio: float,
                   lam: float = 0.08) -> list[float]:
    """Per-block sparsity from outlier ratios, as OWL allocates it: densities
    are the outlier ratios rescaled linearly onto a range of width 2*lam, then
    shifted so their mean density is exactly 1-s. Blocks with more outliers
    are pruned less; equal ratios give the uniform allocation. Where that
    would push a block outside [0, 1) (s near 0 or 1), the deviations from s
    shrink by a common factor: mean and order are kept."""
    d = torch.tensor(list(outlier_ratios), dtype=torch.float64)
    if d.numel() == 0:
        return []
    span = float(d.max() - d.min())
    if span == 0.0 or lam <= 0.0:
        return [float(sparsity_ratio)] * d.numel()
    density = (d - d.min()) / span * (2 * lam)
    dev = density - density.mean()  # density = 1 - s + dev
    room_up, room_down = sparsity_ratio, 1.0 - sparsity_ratio - 1e-6
    shrink = min(1.0, room_up / float(dev.max()), room_down / float(-dev.min()))
    return [float(sparsity_ratio - shrink * x) for x in dev]


# --------------------------------------------------------------------------- checking
def sparsity(W: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((W == 0).sum()) / max(1, W.numel())


def nm_violations(W: torch.Tensor, prune_n: int, prune_m: int) -> int:
    """Number of complete groups of M consecutive weights in a row that hold
    fewer than N zeros (0 means the N:M pattern holds)."""
    rows, cols = W.shape
    full = cols - cols % prune_m
    if full == 0:
        return 0
    zeros = (W[:, :full] == 0).view(rows, -1, prune_m).sum(dim=2)
    return int((zeros < prune_n).sum())
