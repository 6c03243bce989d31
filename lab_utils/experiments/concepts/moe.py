"""MoEfication (Zhang et al. 2022): split a dense MLP into experts, run a few per token.

The neurons are split into K equal experts by balanced k-means over their
normalized input-projection rows (the paper's parameter clustering). Each token
keeps its top-k experts by the sum of |h_j| * ||down[:, j]|| over their neurons,
from its true activations (``oracle``: an upper bound, it needs the dense MLP)
or predicted from the MLP input by a ridge-regression ``linear`` router. The
other neurons' h is zeroed before the output projection: quality is measured
exactly, while a real MoE kernel would also skip their multiply-adds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from lab_utils.core import memo
from lab_utils.core.checks import whole_number
from lab_utils.core.evaluation.perplexity import perplexity
from lab_utils.core.models import set_module, weight_out_in
from lab_utils.core.progress import tqdm
from lab_utils.experiments.concepts.decoder import Decoder, baseline
from lab_utils.experiments.concepts.structured import MLP, mlps, run_windows

ROUTERS = ("oracle", "linear")


class MoEError(ValueError):
    """Bad MoEfication input, in one line that names the fix."""


# --------------------------------------------------------------------------- splitting
def neuron_vectors(mlp: MLP) -> torch.Tensor:
    """One unit vector per neuron: its rows of every input projection, concatenated."""
    V = torch.cat([weight_out_in(m).float() for m in mlp.inputs], dim=1)
    return F.normalize(V, dim=1)


def balanced_assign(score: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each of n items to one of K clusters, at most ``capacity`` per
    cluster, greedily by descending score (n x K). Returns labels (n,)."""
    n, K = score.shape
    if capacity * K < n:
        raise MoEError(f"{K} clusters of {capacity} cannot hold {n} items")
    # plain Python lists: this loop visits up to n x K pairs, and indexing numpy
    # arrays one element at a time costs several times more than a list
    order = np.argsort(-score.numpy().ravel(), kind="stable").tolist()
    labels, counts = [-1] * n, [0] * K
    left = n
    for flat in order:
        i, k = divmod(flat, K)
        if labels[i] < 0 and counts[k] < capacity:
            labels[i] = k
            counts[k] += 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(labels, dtype=torch.int64)


def balanced_kmeans(X: torch.Tensor, n_clusters: int, n_iter: int = 10,
                    seed: int = 0) -> torch.Tensor:
    """Labels (n,) of a k-means on the rows of X with every cluster of size n / K."""
    n = X.shape[0]
    if n % whole_number("moe_experts", n_clusters, error=MoEError):
        raise MoEError(f"moe_experts={n_clusters!r} must be a positive divisor of the MLP "
                       f"width {n} (e.g. 8, 16 or 32 for 1536)")
    X = X.float()
    g = torch.Generator().manual_seed(seed)
    centroids = X[torch.randperm(n, generator=g)[:n_clusters]].clone()
    labels = None
    for _ in range(n_iter):
        # -||x - c||^2 up to a constant per row: 2 x.c - ||c||^2
        score = 2 * X @ centroids.T - (centroids**2).sum(1)
        new = balanced_assign(score, n // n_clusters)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        for k in range(n_clusters):
            centroids[k] = X[labels == k].mean(0)
    return labels


def split_experts(model: nn.Module, n_experts: int, seed: int = 0) -> list[torch.Tensor]:
    """Expert labels of every neuron, one tensor per MLP."""
    return [balanced_kmeans(neuron_vectors(m), n_experts, seed=seed)
            for m in tqdm(mlps(model), desc="k-means", leave=False)]


def expert_sums(h: torch.Tensor, labels: torch.Tensor, n_experts: int,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of |h_j| * weight_j over each expert's neurons: tokens x width -> tokens x K.

    With ``weight`` = the norms of the output projection's columns, |h_j| *
    ||down[:, j]|| bounds neuron j's contribution to the MLP output, so the
    sum says how much output an expert carries for this token.
    """
    onehot = F.one_hot(labels, n_experts).to(h.dtype)
    a = h.abs() if weight is None else h.abs() * weight.to(h.dtype)
    return a @ onehot


def output_norms(output: nn.Module) -> torch.Tensor:
    """||down[:, j]||_2 for every neuron j of an MLP's output projection ``down``."""
    return weight_out_in(output).detach().float().norm(dim=0)


# --------------------------------------------------------------------------- routers
def calibration_activations(model: nn.Module, experts: list[torch.Tensor], windows: torch.Tensor):
    """Per MLP: (inputs x: tokens x d_model, expert sums of |h|: tokens x K) on calibration text."""
    layers = mlps(model)
    K = int(experts[0].max()) + 1
    norms = [output_norms(m.output) for m in layers]
    xs = [[] for _ in layers]
    ss = [[] for _ in layers]

    def keep_x(i):
        def fn(_m, args):
            xs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())
        return fn

    def keep_s(i):
        def fn(_m, args):
            h = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
            ss[i].append(expert_sums(h, experts[i], K, norms[i]))
        return fn

    handles = []
    for i, m in enumerate(layers):
        handles.append(m.inputs[0].register_forward_pre_hook(keep_x(i)))
        handles.append(m.output.register_forward_pre_hook(keep_s(i)))
    run_windows(model, windows, handles, "router data")
    return [(torch.cat(x), torch.cat(s)) for x, s in zip(xs, ss, strict=True)]


def fit_linear_router(x: torch.Tensor, target: torch.Tensor,
                      ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(W d x K, b K): ridge regression of the expert sums on the MLP input.

    ``ridge`` is relative to the mean eigenvalue of the (centred) input covariance.
    """
    x, target = x.double(), target.double()
    mx, mt = x.mean(0), target.mean(0)
    xc, tc = x - mx, target - mt
    A = xc.T @ xc
    lam = ridge * torch.trace(A) / A.shape[0]
    W = torch.linalg.solve(A + lam * torch.eye(A.shape[0], dtype=A.dtype), xc.T @ tc)
    b = mt - mx @ W
    return W.float(), b.float()


def top_k_recall(pred: torch.Tensor, true: torch.Tensor, top_k: int) -> float:
    """Fraction of the true top-k experts that the predicted scores also pick."""
    p = torch.zeros_like(pred, dtype=torch.bool).scatter_(1, pred.topk(top_k, dim=1).indices, True)
    t = torch.zeros_like(true, dtype=torch.bool).scatter_(1, true.topk(top_k, dim=1).indices, True)
    return float((p & t).sum() / t.sum())


# --------------------------------------------------------------------------- the MoE layer
@dataclass
class Captured:
    """How much of the dense MLP output the chosen experts reproduce.

    Per token, captured = 1 - ||W h - W (h * mask)||^2 / ||W h||^2 (1 when the
    experts reproduce the output exactly); the fraction is its mean over every
    token of every MLP, so the few tokens with huge activations (the first
    token of a window, typically) do not decide it alone.
    """

    captured_sum: float = 0.0
    tokens: int = 0

    def add(self, dense: torch.Tensor, moe: torch.Tensor) -> None:
        err = ((dense - moe).double() ** 2).sum(-1)
        norm = (dense.double() ** 2).sum(-1)
        ok = norm > 0
        self.captured_sum += float((1 - err[ok] / norm[ok]).sum())
        self.tokens += int(ok.sum())

    @property
    def fraction(self) -> float:
        return self.captured_sum / self.tokens if self.tokens else float("nan")


class MoEOutput(nn.Module):
    """Wraps an MLP's output projection: keeps each token's top-k experts of h."""

    def __init__(self, output: nn.Module, labels: torch.Tensor, top_k: int, router: str,
                 router_weights: tuple[torch.Tensor, torch.Tensor] | None, captured: Captured):
        super().__init__()
        self.output, self.top_k, self.router = output, top_k, router
        self.n_experts = int(labels.max()) + 1
        self.register_buffer("labels", labels.clone(), persistent=False)
        self.register_buffer("norms", output_norms(output), persistent=False)
        self.router_weights = router_weights
        self.captured = captured
        self.x = None  # the MLP input of the current forward, set by a pre-hook

    def expert_mask(self, h: torch.Tensor) -> torch.Tensor:
        """tokens x width mask of the neurons in each token's top-k experts."""
        if self.router == "oracle":
            scores = expert_sums(h, self.labels, self.n_experts, self.norms)
        else:
            W, b = self.router_weights
            scores = self.x.reshape(-1, W.shape[0]).to(W.dtype) @ W + b
        chosen = torch.zeros(scores.shape, dtype=h.dtype, device=h.device)
        chosen.scatter_(1, scores.topk(self.top_k, dim=1).indices, 1.0)
        return chosen[:, self.labels]

    def forward(self, h):
        shape = h.shape
        flat = h.reshape(-1, shape[-1])
        kept = flat * self.expert_mask(flat)
        W = weight_out_in(self.output)
        dense, moe = F.linear(flat, W), F.linear(kept, W)
        self.captured.add(dense, moe)
        bias = getattr(self.output, "bias", None)
        out = moe if bias is None else moe + bias
        return out.reshape(*shape[:-1], out.shape[-1])


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise MoEError("output projection not found in the model")


@contextlib.contextmanager
def moefied(model: nn.Module, experts: list[torch.Tensor], top_k: int, router: str = "oracle",
            routers: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """Inside the ``with``, every MLP runs only each token's top-k experts.

    Yields a :class:`Captured` that accumulates how much of the dense MLP
    output the chosen experts reproduce. The model is restored on exit.
    """
    if router not in ROUTERS:
        raise MoEError(f"unknown router {router!r}; choose one of {', '.join(ROUTERS)}")
    if router == "linear" and routers is None:
        raise MoEError("router='linear' needs the fitted routers (fit_linear_router per MLP)")
    K = int(experts[0].max()) + 1
    if not 1 <= top_k <= K:
        raise MoEError(f"top_k={top_k} must be between 1 and the number of experts {K}")
    layers = mlps(model)
    captured = Captured()
    installed, handles = [], []
    try:
        for i, m in enumerate(layers):
            wrap = MoEOutput(m.output, experts[i], top_k, router,
                             routers[i] if routers is not None else None, captured)
            name = _name_of(model, m.output)
            set_module(model, name, wrap)
            installed.append((name, m.output))
            handles.append(m.inputs[0].register_forward_pre_hook(
                lambda _mod, args, w=wrap: setattr(w, "x", args[0])))
        yield captured
    finally:
        for h in handles:
            h.remove()
        for name, original in installed:
            set_module(model, name, original)


def active_top_k(fraction: float, n_experts: int) -> int:
    """The number of experts that makes ``fraction`` of the MLP neurons active."""
    k = fraction * n_experts
    if not 0 < fraction <= 1 or abs(k - round(k)) > 1e-9:
        raise MoEError(f"active fraction {fraction!r} x {n_experts} experts is not a whole number "
                       f"of experts in [1, {n_experts}]; use multiples of 1/{n_experts}")
    return int(round(k))


# --------------------------------------------------------------------------- the demo
def fit_routers(model: nn.Module, experts: list[torch.Tensor], calibration: torch.Tensor, ks=(1,)):
    """Linear routers fitted on the first 3/4 of the calibration windows, and
    their top-k recall of the true experts on the held-out last quarter
    ({k: recall}, empty with a single window)."""
    n_fit = max(1, (3 * len(calibration)) // 4)
    fit = calibration_activations(model, experts, calibration[:n_fit])
    routers = [fit_linear_router(x, s) for x, s in fit]
    recalls = {}
    if n_fit < len(calibration):
        held = calibration_activations(model, experts, calibration[n_fit:])
        for k in sorted(set(ks)):
            recalls[k] = float(np.mean([top_k_recall(x @ W + b, s, k)
                                        for (x, s), (W, b) in zip(held, routers, strict=True)]))
    return routers, recalls


def mlp_macs_per_token(mlp: MLP) -> int:
    """Multiply-adds of one dense MLP for one token."""
    return sum(weight_out_in(m).numel() for m in mlp.inputs) + weight_out_in(mlp.output).numel()


@memo.step("01-moe", timed_as="5 MoEfication")
def demo(decoder: Decoder, n_experts: int, active_fractions=(0.125, 0.25, 0.5, 1.0),
         routers=ROUTERS) -> pd.DataFrame:
    """(table, timing row): perplexity and captured MLP output vs the fraction
    of neurons active per token.

    One row per router x active fraction: perplexity, the captured fraction
    of the MLP output, the MLP multiply-adds a real MoE kernel would run
    (linear router, router included; the oracle needs the dense MLP to route)
    and the linear router's held-out recall of the true top-k experts.
    """
    model = decoder.lm.model
    dense_ppl, _ = baseline(decoder)
    ks = [active_top_k(f, n_experts) for f in active_fractions]
    experts = split_experts(model, n_experts, seed=decoder.seed)
    layers = mlps(model)
    mlp_macs = mlp_macs_per_token(layers[0])
    d_model = weight_out_in(layers[0].inputs[0]).shape[1]
    fitted, recalls = None, {}
    if "linear" in routers:
        fitted, recalls = fit_routers(model, experts, decoder.calibration, ks)
    rows, every = [], None
    for router in routers:
        for f, k in zip(active_fractions, ks, strict=True):
            if k == n_experts and every is not None:
                ppl, captured = every  # every expert active: the same model whatever the router
            else:
                with moefied(model, experts, k, router, fitted) as captured:
                    ppl = perplexity(model, decoder.windows)
                if k == n_experts:
                    every = ppl, captured
            router_macs = d_model * n_experts if router == "linear" and k < n_experts else 0
            macs = k / n_experts * mlp_macs + router_macs
            rows.append({"router": router, "active_fraction": f, "top_k": k, "experts": n_experts,
                         "perplexity": ppl, "captured": captured.fraction,
                         "mlp_macs_fraction": macs / mlp_macs if router == "linear" else float("nan"),
                         "router_recall": recalls.get(k, float("nan")) if router == "linear"
                         else 1.0})
    table = pd.DataFrame(rows)
    table["dense_perplexity"] = dense_ppl
    return table
