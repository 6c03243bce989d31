"""The pruning driver: layer-sequential calibration for all three families.

The mask math lives in :mod:`lab_utils.sparsify`; this module feeds it. For a
calibrated method (Wanda, SparseGPT) the calibration samples go through the
model one transformer block at a time, as in the reference code of both
papers, but batched:

1. capture the inputs of block 0 (hidden states plus every keyword argument
   the block receives: attention masks, rotary position embeddings, encoder
   hidden states for cross-attention);
2. run block i once with hooks on its prunable layers to collect their input
   statistics (squared input norms for Wanda, the Hessian 2XX^T/n for
   SparseGPT), all from the dense block;
3. prune every layer of block i;
4. run the pruned block i to get the inputs of block i+1.

An encoder-decoder model does its encoder first; the decoder's inputs are then
captured by running the model with the already pruned encoder, so its
cross-attention layers are calibrated on what the pruned encoder produces.
Memory stays at the model plus one block's activations for the calibration set.

:func:`prune_model` prunes a loaded model in place; :func:`pruned_model`
adds a checkpoint cache keyed by every argument.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lab_utils import io, sparsify
from lab_utils.models import (
    ENCODER_DECODER,
    LoadedModel,
    ModelSpec,
    find_layers,
    load_model,
    prunable_layers,
    resolve,
    transformer_blocks,
    weight_out_in,
)
from lab_utils.sparsify import SparsityError

ENGINE_VERSION = 2  # part of every cache key: bump when pruning results change (2: packed speech windows)
DEFAULT_NSAMPLES = 64
DEFAULT_SEQLEN = 512  # embedded models; hub presets use the model's context
BATCH_TOKENS = 8192  # calibration tokens pushed through a block at once
SPEECH_PER_WINDOW = 4  # Whisper calibration: sentences packed into one 30 s window
OWL_LAMBDA = 0.08  # OWL's defaults for LLaMA (Yin et al. 2023)
OWL_M = 5.0


# --------------------------------------------------------------------------- arguments
@dataclass(frozen=True)
class PruneConfig:
    """Every argument that changes the pruned weights, checked and normalized:
    arguments that a method ignores are set to None so that they do not split
    the cache (magnitude does not depend on nsamples)."""

    method: str
    sparsity: float
    pattern: str
    scope: str | None
    nsamples: int | None
    seqlen: int | None
    seed: int | None
    owl: bool
    calibration: str | None

    @property
    def prune_n(self) -> int:
        return sparsify.parse_pattern(self.pattern)[0]

    @property
    def prune_m(self) -> int:
        return sparsify.parse_pattern(self.pattern)[1]

    @property
    def calibrated(self) -> bool:
        return self.method in sparsify.CALIBRATED or self.owl


NATURAL_SCOPE = {"random": "layer", "magnitude": "layer", "wanda": "row", "sparsegpt": None}


def make_config(method: str, sparsity_ratio, pattern="unstructured", scope: str | None = None,
                nsamples: int | None = DEFAULT_NSAMPLES, seqlen: int | None = None, seed: int = 0,
                owl: bool = False, calibration: str | None = None) -> PruneConfig:
    """Check every argument; raise one :class:`SparsityError` naming the fix."""
    sparsify.check_method(method)
    s = sparsify.check_sparsity_ratio(sparsity_ratio)
    prune_n, prune_m = sparsify.parse_pattern(pattern)
    pattern = sparsify.pattern_name(prune_n, prune_m)
    if scope is not None:
        sparsify.check_scope(scope)
    if method == "sparsegpt" and scope not in (None, "layer"):
        raise SparsityError(f"sparsegpt chooses its mask per block of 128 columns; scope {scope!r} "
                            f"does not apply (leave scope unset)")
    if method == "wanda" and scope == "global":
        raise SparsityError("wanda scores are not comparable across layers; use scope 'row' "
                            "(the paper's) or 'layer'")
    if prune_n and scope == "global":
        raise SparsityError(f"an N:M pattern fixes the mask inside each group of {prune_m} weights; "
                            f"scope 'global' does not apply (leave scope unset)")
    # N:M picks inside each group of M; sparsegpt picks per block of columns
    scope = None if (prune_n or method == "sparsegpt") else (scope or NATURAL_SCOPE[method])
    owl = bool(owl)
    if owl and prune_n:
        raise SparsityError("OWL allocates unstructured sparsity across layers; an N:M pattern is "
                            "the same in every layer (use owl=False or pattern='unstructured')")
    if owl and scope == "global":
        raise SparsityError("OWL sets one sparsity per block; scope 'global' already ranks all "
                            "layers together (use one of them)")
    if s == 0:  # the dense model: nothing else matters
        return PruneConfig(method, 0.0, sparsify.UNSTRUCTURED, None, None, None, None, False, None)
    calibrated = method in sparsify.CALIBRATED or owl
    if calibrated:
        if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples <= 0:
            raise SparsityError(f"{method}{' with OWL' if owl else ''} needs calibration data: "
                                f"nsamples must be a positive integer, got {nsamples!r}")
        if seqlen is not None and (isinstance(seqlen, bool) or not isinstance(seqlen, int)
                                   or seqlen <= 1):
            raise SparsityError(f"seqlen must be an integer > 1, got {seqlen!r}")
    else:
        nsamples = seqlen = calibration = None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SparsityError(f"seed must be a non-negative integer, got {seed!r}")
    if method == "magnitude" and not owl:
        seed = None
    return PruneConfig(method, s, pattern, scope, nsamples, seqlen, seed, owl, calibration)


def default_seqlen(lm: LoadedModel) -> int:
    """Calibration length: the model's context for hub presets (as in the
    papers), else 512 tokens capped by the context."""
    return _default_seqlen(lm.spec, lm.model.config)


def _default_seqlen(spec: ModelSpec, config) -> int:
    ctx = config_context(config)
    return ctx if spec.source == "hub" else min(DEFAULT_SEQLEN, ctx)


def model_context(model: nn.Module) -> int:
    return config_context(model.config)


def config_context(config) -> int:
    """Token positions of a model, read from its (Hugging Face) config."""
    for attr in ("n_positions", "max_position_embeddings", "max_target_positions"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return DEFAULT_SEQLEN


def default_calibration(lm: LoadedModel) -> str:
    """C4 for the seed's hub models (as in the papers), movie reviews otherwise."""
    return _default_calibration(lm.spec)


def _default_calibration(spec: ModelSpec) -> str:
    return "c4" if spec.source == "hub" else "movie-reviews"


def hf_config(spec: ModelSpec):
    """A model's Hugging Face config, read without loading its weights."""
    from transformers import AutoConfig

    from lab_utils.models import embedded_model_dir

    location = embedded_model_dir(spec.name)[0] if spec.source == "embedded" else spec.location
    return AutoConfig.from_pretrained(location, local_files_only=spec.source != "hub")


def resolve_config(spec: ModelSpec, cfg: PruneConfig, config) -> PruneConfig:
    """``cfg`` with the calibration defaults filled in (length and corpus, from
    the model's config alone): the configuration a checkpoint is keyed on.
    Whisper calibrates on whole 30 s windows, so it has no ``seqlen``."""
    if not cfg.calibrated:
        return cfg
    seqlen = None if getattr(config, "model_type", "") == "whisper" else (
        cfg.seqlen or _default_seqlen(spec, config))
    return PruneConfig(**{**asdict(cfg), "seqlen": seqlen,
                          "calibration": cfg.calibration or _default_calibration(spec)})


# --------------------------------------------------------------------------- calibration inputs
@dataclass
class Chunk:
    """One batch of calibration samples as one side's blocks see it."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    token_mask: torch.Tensor | None = None  # (batch, tokens) True where a real token


class _Caught(Exception):
    pass


def _model_kwargs(model: nn.Module) -> dict:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def calibration_batches(lm: LoadedModel, nsamples: int, seqlen: int, seed: int = 0,
                        corpus: str | None = None, batch_tokens: int = BATCH_TOKENS,
                        progress: bool = False) -> list[dict]:
    """Model inputs for calibration, in batches of about ``batch_tokens`` tokens.

    Each item is ``{"inputs": kwargs for model(...), "masks": {side: token mask}}``.
    Text models get ``nsamples`` random windows of ``seqlen`` tokens (an
    encoder-decoder text model sees the window on both sides, teacher-forced
    for the decoder); Whisper gets synthesized speech of ``nsamples`` held-out
    sentences, :data:`SPEECH_PER_WINDOW` to a 30 s window, teacher-forced with
    their tokenized text.
    """

    model = lm.model
    if getattr(model.config, "model_type", "") == "whisper":
        return _speech_batches(lm, nsamples, seed, batch_tokens, progress)
    ctx = model_context(model)
    if seqlen > ctx:
        raise SparsityError(f"seqlen {seqlen} exceeds the context of {lm.spec.name} ({ctx} tokens)")
    windows = _windows(lm.tokenizer, nsamples, seqlen, seed, corpus or default_calibration(lm))
    bs = max(1, batch_tokens // seqlen)
    out = []
    for i in range(0, windows.shape[0], bs):
        w = windows[i:i + bs]
        inputs = {"input_ids": w}
        if lm.family == ENCODER_DECODER:
            inputs["decoder_input_ids"] = _shift_right(w, model.config)
        out.append({"inputs": inputs, "masks": {}})
    return out


_WINDOWS: dict = {}


def _windows(tokenizer, nsamples: int, seqlen: int, seed: int, corpus: str) -> torch.Tensor:
    """Calibration windows, remembered per tokenizer (its class, folder and
    size): tokenizing the whole calibration text takes seconds, and a sweep
    asks for the same windows again and again."""
    from lab_utils import data

    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
           nsamples, seqlen, seed, corpus)
    if key not in _WINDOWS:
        if len(_WINDOWS) >= 16:
            _WINDOWS.pop(next(iter(_WINDOWS)))
        _WINDOWS[key] = data.calibration_windows(tokenizer, nsamples, seqlen, seed, corpus)
    return _WINDOWS[key]


def _shift_right(ids: torch.Tensor, config) -> torch.Tensor:
    start = config.decoder_start_token_id
    start = config.bos_token_id if start is None else start
    out = ids.new_empty(ids.shape)
    out[:, 1:] = ids[:, :-1]
    out[:, 0] = start
    return out


def _speech_batches(lm: LoadedModel, nsamples: int, seed: int, batch_tokens: int,
                    progress: bool) -> list[dict]:
    from lab_utils import data
    from lab_utils.evaluation import asr

    cfg = lm.model.config
    sentences = data.calibration_sentences(nsamples, seed)
    # Whisper's encoder always reads 30 s: one short sentence per window would
    # be mostly padding, so the statistics would come mostly from silence (and
    # cost four times the compute). Consecutive sentences share a window.
    texts, audio = asr.pack(sentences, data.speech(sentences, progress=progress), SPEECH_PER_WINDOW)
    fe = lm.feature_extractor
    start = cfg.decoder_start_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    ids = []
    for t in texts:
        tok = list(lm.tokenizer(t).input_ids)
        if not tok or tok[0] != start:
            tok = [start] + tok
        ids.append(tok[: cfg.max_target_positions])
    frames = 2 * cfg.max_source_positions  # mel frames per 30 s window
    bs = max(1, batch_tokens // cfg.max_source_positions)
    out = []
    for i in range(0, len(texts), bs):
        feats = fe(audio[i:i + bs], sampling_rate=fe.sampling_rate, return_tensors="pt")
        features = feats.input_features[..., :frames]
        batch = ids[i:i + bs]
        n = max(len(x) for x in batch)
        dec = torch.full((len(batch), n), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for j, x in enumerate(batch):
            dec[j, :len(x)] = torch.tensor(x)
            mask[j, :len(x)] = 1
        out.append({"inputs": {"input_features": features, "decoder_input_ids": dec,
                               "decoder_attention_mask": mask},
                    "masks": {"decoder": mask.bool()}})
    return out


@torch.no_grad()
def capture_inputs(model: nn.Module, block: nn.Module, batches: list[dict], side: str) -> list[Chunk]:
    """Run the model on each batch until ``block`` is called; keep what it receives."""
    caught: list = []

    def catch(_module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        caught.append((hidden, rest, dict(kwargs)))
        raise _Caught

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    chunks = []
    try:
        for b in batches:
            try:
                model(**b["inputs"], **_model_kwargs(model))
            except _Caught:
                pass
            else:
                raise RuntimeError(f"the {side} blocks were never called; cannot calibrate")
            hidden, rest, kwargs = caught.pop()
            chunks.append(Chunk(hidden, rest, kwargs, b["masks"].get(side)))
    finally:
        handle.remove()
    return chunks


def _block_output(out):
    return out[0] if isinstance(out, tuple | list) else out


# --------------------------------------------------------------------------- statistics
class _StopBlock(Exception):
    pass


@torch.no_grad()
def collect_statistics(block: nn.Module, layers: dict[str, nn.Module], chunks: list[Chunk],
                       kind: str, propagate: bool = False) -> dict[str, dict]:
    """Input statistics of each layer of ``block`` over every calibration token.

    ``kind="norm"``: per-input-feature sums of squares (Wanda);
    ``kind="hessian"``: sums of x x^T (SparseGPT). Layers that read the same
    input tensor (q/k/v, gate/up) share one computation. With
    ``propagate=False`` the forward stops once every layer has been seen (the
    outputs are recomputed by the pruned block anyway), which skips the last
    layer's matmul; with ``propagate=True`` the chunks' hidden states are
    replaced by the block's outputs.
    Returns ``{name: {"sum": tensor, "count": tokens}}``.
    """
    stats = {name: {"sum": None, "count": 0} for name in layers}
    memo: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    seen: set[str] = set()
    mask_holder: list = [None]

    def make_hook(name):
        def hook(_module, args):
            x = args[0]
            key = id(x)
            if key not in memo:
                X = x.reshape(-1, x.shape[-1])
                m = mask_holder[0]
                if m is not None and tuple(x.shape[:-1]) == tuple(m.shape):
                    X = X[m.reshape(-1)]
                X = X.float()
                inc = X.T @ X if kind == "hessian" else (X * X).sum(dim=0)
                memo[key] = (x, inc, X.shape[0])  # holding x keeps its id unique
            _, inc, n = memo[key]
            st = stats[name]
            st["sum"] = inc.clone() if st["sum"] is None else st["sum"].add_(inc)
            st["count"] += n
            seen.add(name)
            if not propagate and len(seen) == len(layers):
                raise _StopBlock

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        for c in chunks:
            memo.clear()
            seen.clear()
            mask_holder[0] = c.token_mask
            try:
                out = block(c.hidden, *c.args, **c.kwargs)
                if propagate:
                    c.hidden = _block_output(out)
            except _StopBlock:
                pass
    finally:
        for h in handles:
            h.remove()
        memo.clear()
    return stats


@torch.no_grad()
def propagate(block: nn.Module, chunks: list[Chunk]) -> None:
    """Replace each chunk's hidden states by the block's outputs."""
    for c in chunks:
        c.hidden = _block_output(block(c.hidden, *c.args, **c.kwargs))


# --------------------------------------------------------------------------- pruning one layer
def _layer_seed(seed: int | None, index: int) -> int:
    return (seed or 0) * 1_000_003 + index


@torch.no_grad()
def prune_layer(module: nn.Module, cfg: PruneConfig, sparsity_ratio: float, stat: dict | None,
                index: int = 0, W_mask: torch.Tensor | None = None) -> None:
    """Prune one linear layer in place with the configured method."""
    W = weight_out_in(module)
    n, m = cfg.prune_n, cfg.prune_m
    if W_mask is not None:
        pass
    elif cfg.method == "random":
        W_mask = sparsify.random_mask(W, sparsity_ratio, n, m, cfg.scope, _layer_seed(cfg.seed, index))
    elif cfg.method == "magnitude" or stat is None or stat["count"] == 0:
        W_mask = sparsify.magnitude_mask(W, sparsity_ratio, n, m, cfg.scope or "row")
    elif cfg.method == "wanda":
        W_mask = sparsify.wanda_mask(W, stat["sum"] / stat["count"], sparsity_ratio, n, m, cfg.scope)
    else:
        H = stat["sum"].mul_(2.0 / stat["count"])
        W_new, _ = sparsify.sparsegpt_prune(W, H, sparsity_ratio, n, m)
        W.copy_(W_new.to(W.dtype))
        return
    W.masked_fill_(W_mask, 0)


# --------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak resident memory (RSS) of this process while the block runs.

    Linux resets the high-water mark when 5 is written to
    /proc/self/clear_refs, and reports it as VmHWM; elsewhere a background
    thread samples the RSS every 20 ms. Works on CPU, without tracemalloc.
    """

    def __init__(self):
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None
        self._hwm = False

    @staticmethod
    def _rss() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    @staticmethod
    def _vmhwm() -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) * 1024

    def __enter__(self):
        self.start = self._rss()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._vmhwm()
            self._hwm = True
        except (OSError, AttributeError):
            self._hwm = False
            self.peak = self.start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        if self._hwm:
            self.peak = max(self._vmhwm(), self._rss())
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        return False


# --------------------------------------------------------------------------- the report
@dataclass
class PruneReport:
    model: str
    family: str
    method: str
    sparsity: float  # requested
    pattern: str
    scope: str | None
    nsamples: int | None
    seqlen: int | None
    seed: int | None
    owl: bool
    calibration: str | None
    actual_sparsity: float = 0.0  # over the prunable layers
    actual_sparsity_total: float = 0.0  # over all parameters
    prunable_params: int = 0
    total_params: int = 0
    nm_verified: bool | None = None  # None for unstructured
    nm_violations: int = 0
    seconds: float = 0.0  # wall clock, model loading excluded
    threads: int = 0  # torch threads the pruning ran on (0: not recorded, a checkpoint from before)
    cpu_seconds: float = 0.0  # CPU time of all threads (less sensitive to a busy machine)
    peak_memory_bytes: int = 0  # peak RSS of the process while pruning
    start_memory_bytes: int = 0  # RSS when pruning started (model loaded)
    layers: list[dict] = field(default_factory=list)
    block_sparsity: dict = field(default_factory=dict)  # OWL targets per side
    checkpoint: str | None = None
    key: str = ""
    from_cache: bool = False

    def layer_table(self):
        import pandas as pd

        return pd.DataFrame(self.layers)

    def summary(self) -> dict:
        """The headline numbers (what the command line prints)."""
        keep = ("model", "method", "pattern", "sparsity", "scope", "nsamples", "seqlen", "seed",
                "owl", "actual_sparsity", "actual_sparsity_total", "nm_verified", "seconds", "cpu_seconds",
                "peak_memory_bytes", "checkpoint", "key", "from_cache")
        return {k: getattr(self, k) for k in keep}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str) + "\n"

    @classmethod
    def from_json(cls, text: str) -> PruneReport:
        return cls(**json.loads(text))


def sparsity_table(model: nn.Module) -> list[dict]:
    """Actual sparsity of every prunable layer (zeros counted in the weights)."""
    rows = []
    for pl in prunable_layers(model):
        W = pl.weight
        rows.append({"name": pl.name, "side": pl.side, "block": pl.block,
                     "component": pl.component, "numel": W.numel(),
                     "zeros": W.numel() - int(torch.count_nonzero(W)), "sparsity": sparsify.sparsity(W)})
    return rows


def fill_report(report: PruneReport, model: nn.Module, targets: dict[str, float] | None = None) -> None:
    """Measure what the pruning did: sparsity per layer, over the prunable
    layers and over all parameters, and the N:M check."""
    rows = sparsity_table(model)
    for r in rows:
        r["target"] = (targets or {}).get(r["name"], report.sparsity)
    report.layers = rows
    report.prunable_params = sum(r["numel"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    report.actual_sparsity = zeros / max(1, report.prunable_params)
    params = list(model.parameters())  # tied tensors once
    report.total_params = sum(p.numel() for p in params)
    # numel - count_nonzero, not (p == 0).sum(): summing a bool tensor materializes it as
    # int64 (2x a float32 embedding's bytes at once) and is ~7x slower on CPU
    zeros_total = sum(p.numel() - int(torch.count_nonzero(p)) for p in params)
    report.actual_sparsity_total = zeros_total / max(1, report.total_params)
    prune_n, prune_m = sparsify.parse_pattern(report.pattern)
    if prune_n:
        report.nm_violations = sum(sparsify.nm_violations(pl.weight, prune_n, prune_m)
                                   for pl in prunable_layers(model))
        report.nm_verified = report.nm_violations == 0
    else:
        report.nm_verified, report.nm_violations = None, 0


# --------------------------------------------------------------------------- the driver
def _sides_in_order(model: nn.Module) -> list[tuple[str, str, nn.ModuleList]]:
    sides = transformer_blocks(model)
    order = [s for s in ("encoder", "decoder") if s in sides]
    return [(s, *sides[s]) for s in order]


def _block_layers(block: nn.Module) -> dict[str, nn.Module]:
    return find_layers(block)


def prune_model(lm: LoadedModel, method: str, sparsity_ratio, pattern="unstructured",
                scope: str | None = None, nsamples: int | None = DEFAULT_NSAMPLES,
                seqlen: int | None = None, seed: int = 0, owl: bool = False,
                calibration: str | None = None, owl_lambda: float = OWL_LAMBDA,
                owl_m: float = OWL_M, batch_tokens: int = BATCH_TOKENS,
                progress: bool = True) -> PruneReport:
    """Prune ``lm.model`` in place and return what was done.

    ``method``: random | magnitude | wanda | sparsegpt; ``pattern``:
    "unstructured" or "N:M"; ``scope``: row | layer | global for magnitude
    and random (default layer), row | layer for wanda (default row); ``owl``:
    non-uniform sparsity per block from the activation outliers (unstructured
    only). Calibrated methods use ``nsamples`` windows of ``seqlen`` tokens
    (default: the model's context for hub presets, 512 otherwise) from
    ``calibration`` (default: C4 for hub presets, movie reviews otherwise).
    """
    cfg = make_config(method, sparsity_ratio, pattern, scope, nsamples, seqlen, seed, owl, calibration)
    cfg = resolve_config(lm.spec, cfg, lm.model.config)
    report = PruneReport(lm.spec.name, lm.family, **asdict(cfg), threads=torch.get_num_threads())
    model = lm.model
    model.eval()
    targets: dict[str, float] = {}
    with PeakMemory() as mem, torch.no_grad():
        t0, c0 = time.perf_counter(), time.process_time()
        if cfg.sparsity > 0:
            _prune(lm, cfg, targets, report, owl_lambda, owl_m, batch_tokens, progress)
        report.seconds = time.perf_counter() - t0
        report.cpu_seconds = time.process_time() - c0
    report.peak_memory_bytes, report.start_memory_bytes = mem.peak, mem.start
    fill_report(report, model, targets)
    return report


def _prune(lm, cfg, targets, report, owl_lambda, owl_m, batch_tokens, progress):
    from tqdm.auto import tqdm

    model = lm.model
    sides = _sides_in_order(model)
    if not sides:
        raise SparsityError(f"{lm.spec.name}: no transformer blocks found to prune")
    block_sparsity = {side: [cfg.sparsity] * len(blocks) for side, _, blocks in sides}

    if not cfg.calibrated:
        _prune_uncalibrated(model, cfg, targets, progress)
        return

    batches = calibration_batches(lm, cfg.nsamples, cfg.seqlen, cfg.seed or 0, cfg.calibration,
                                  batch_tokens, progress)
    if cfg.owl:
        block_sparsity = _owl_allocation(model, sides, batches, cfg.sparsity, owl_lambda, owl_m,
                                         progress)
        report.block_sparsity = block_sparsity

    index = 0
    for side, prefix, blocks in sides:
        chunks = capture_inputs(model, blocks[0], batches, side)
        desc = f"{cfg.method} {side}"
        for i, block in enumerate(tqdm(blocks, desc=desc, disable=not progress, leave=False)):
            layers = _block_layers(block)
            s = block_sparsity[side][i]
            stats = {}
            if cfg.method in sparsify.CALIBRATED:
                kind = "hessian" if cfg.method == "sparsegpt" else "norm"
                stats = collect_statistics(block, layers, chunks, kind)
            for name, module in layers.items():
                prune_layer(module, cfg, s, stats.get(name), index)
                targets[f"{prefix}.{i}.{name}"] = s
                index += 1
            del stats
            if i + 1 < len(blocks):  # the last block's outputs feed nothing we calibrate
                propagate(block, chunks)
        del chunks


def _prune_uncalibrated(model: nn.Module, cfg: PruneConfig, targets: dict, progress: bool) -> None:
    from tqdm.auto import tqdm

    layers = prunable_layers(model)
    if cfg.scope == "global" and not cfg.prune_n:
        if cfg.method == "random":
            g = torch.Generator().manual_seed(_layer_seed(cfg.seed, 0))
            metrics = [torch.rand(pl.shape, generator=g) for pl in layers]
        else:
            metrics = [pl.weight.abs() for pl in layers]
        masks = sparsify.global_masks(metrics, cfg.sparsity)
        del metrics
        for pl, W_mask in zip(layers, masks, strict=True):
            pl.weight.masked_fill_(W_mask, 0)
            targets[pl.name] = cfg.sparsity
        return
    for index, pl in enumerate(tqdm(layers, desc=cfg.method, disable=not progress, leave=False)):
        prune_layer(pl.module, cfg, cfg.sparsity, None, index)
        targets[pl.name] = cfg.sparsity


def _owl_allocation(model, sides, batches, sparsity_ratio, lam, hyper_m, progress) -> dict:
    """OWL: outlier ratio of every block of the dense model (Wanda scores above
    ``hyper_m`` times their block mean), turned into per-block sparsities whose
    mean is the requested one (per side for an encoder-decoder model)."""
    from tqdm.auto import tqdm

    ratios: dict[str, list[float]] = {}
    for side, _prefix, blocks in sides:
        chunks = capture_inputs(model, blocks[0], batches, side)
        ratios[side] = []
        for block in tqdm(blocks, desc=f"owl {side}", disable=not progress, leave=False):
            layers = _block_layers(block)
            stats = collect_statistics(block, layers, chunks, "norm", propagate=True)
            metrics = [sparsify.wanda_metric(weight_out_in(m), stats[n]["sum"] / max(1, stats[n]["count"]))
                       for n, m in layers.items()]
            ratios[side].append(sparsify.outlier_ratio(metrics, hyper_m))
        del chunks
    return {side: sparsify.owl_sparsities(r, sparsity_ratio, lam) for side, r in ratios.items()}


# --------------------------------------------------------------------------- the cache
def cache_key(model_name: str, cfg: PruneConfig) -> str:
    return io.key_hash("pruned", ENGINE_VERSION, model_name, cfg.method, cfg.pattern, cfg.sparsity,
                       cfg.scope, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.owl, cfg.calibration)


def checkpoint_key(spec: ModelSpec, cfg: PruneConfig) -> str:
    """The cache key of ``cfg`` (resolved by :func:`resolve_config`) on a model;
    a local folder is keyed by its absolute path."""
    return cache_key(spec.name if spec.source != "local" else os.path.abspath(spec.location), cfg)


def checkpoint_dir(model_slug: str, cfg: PruneConfig, key: str) -> Path:
    pat = cfg.pattern.replace(":", "of")
    name = f"{model_slug}-{cfg.method}-{pat}-{cfg.sparsity:g}{'-owl' if cfg.owl else ''}-{key}"
    return io.cache_dir() / "pruned" / name


WEIGHTS_FILE = "pruned.safetensors"
REPORT_FILE = "report.json"


def save_checkpoint(model: nn.Module, folder: Path) -> None:
    """The prunable layers' weights in a compact exact form: a packed bit mask
    of the nonzeros and their values (everything else is the base model)."""
    import numpy as np
    from safetensors.torch import save_file

    tensors = {}
    for pl in prunable_layers(model):
        W = pl.weight.detach().contiguous()
        nz = (W != 0).flatten()
        tensors[f"{pl.name}.mask"] = torch.from_numpy(np.packbits(nz.numpy()))
        tensors[f"{pl.name}.values"] = W.flatten()[nz].clone()
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "mask+values"})


@torch.no_grad()
def load_checkpoint(model: nn.Module, folder: Path) -> None:
    import numpy as np
    from safetensors.torch import load_file

    tensors = load_file(str(folder / WEIGHTS_FILE))
    for pl in prunable_layers(model):
        W = pl.weight
        bits = tensors[f"{pl.name}.mask"].numpy()
        nz = torch.from_numpy(np.unpackbits(bits, count=W.numel()).astype(bool))
        flat = torch.zeros(W.numel(), dtype=W.dtype)
        flat[nz] = tensors[f"{pl.name}.values"]
        pl.set_weight(flat.view(W.shape))


def pruned_model(model_name: str, method: str, sparsity, pattern="unstructured",
                 scope: str | None = None, nsamples: int | None = DEFAULT_NSAMPLES,
                 seqlen: int | None = None, seed: int = 0, owl: bool = False,
                 calibration: str | None = None, progress: bool = True, save: bool | None = None,
                 rebuild: bool = False, separate_process: bool = False,
                 **kw) -> tuple[LoadedModel, PruneReport]:
    """Load a model and prune it, or load the cached checkpoint of the same
    pruning. Sparsity 0 returns the dense model (with its measured sparsity).

    The checkpoint lives under ``cache_dir()/pruned/`` keyed by the model and
    every pruning argument (plus the engine version); it is written atomically
    with a checksum manifest, so a cut-short write is never reused. ``save``:
    None (default) checkpoints the calibrated methods only, because random and
    magnitude pruning take less time than reading a checkpoint back.
    ``rebuild=True`` prunes again and replaces the cached checkpoint (and the
    seconds it records: a benchmark on a quiet machine measures afresh).
    ``separate_process=True`` builds a missing calibrated checkpoint in a child
    Python process and then loads it: the calibration activations, Hessians
    and allocator caches of pruning never enter this process (notebook 02 keeps
    its memory near the model's size that way). The engine's own peak is in the
    report either way (``peak_memory_bytes``).
    """
    cfg = make_config(method, sparsity, pattern, scope, nsamples, seqlen, seed, owl, calibration)
    spec = resolve(model_name)
    lm = load_model(spec)
    cfg = resolve_config(spec, cfg, lm.model.config)
    if cfg.sparsity == 0:
        report = PruneReport(spec.name, spec.family, **asdict(cfg))
        fill_report(report, lm.model)
        report.key = cache_key(spec.name, cfg)
        return lm, report
    key = checkpoint_key(spec, cfg)
    folder = checkpoint_dir(spec.slug, cfg, key)
    if not rebuild and io.verify_dir(folder):
        load_checkpoint(lm.model, folder)
        report = PruneReport.from_json((folder / REPORT_FILE).read_text())
        report.from_cache = True
        return lm, report
    if separate_process and cfg.calibrated and (cfg.calibrated if save is None else save):
        _build_in_child(model_name, cfg, kw, rebuild)
        if not io.verify_dir(folder):
            raise SparsityError(f"the child process that pruned {model_name} left no valid checkpoint "
                                f"in {folder}; run prune.pruned_model(...) in this process to see why")
        load_checkpoint(lm.model, folder)
        return lm, PruneReport.from_json((folder / REPORT_FILE).read_text())
    report = prune_model(lm, cfg.method, cfg.sparsity, cfg.pattern, cfg.scope, cfg.nsamples,
                         cfg.seqlen, cfg.seed or 0, cfg.owl, cfg.calibration, progress=progress, **kw)
    report.key = key
    if not (cfg.calibrated if save is None else save):
        return lm, report
    report.checkpoint = str(folder)
    with io.atomic_dir(folder) as tmp:
        save_checkpoint(lm.model, tmp)
        (tmp / REPORT_FILE).write_text(report.to_json())
    return lm, report


def _build_in_child(model_name: str, cfg: PruneConfig, kw: dict, rebuild: bool = False) -> None:
    """Run :func:`pruned_model` for ``cfg`` in a fresh Python process (same
    environment, cache and thread count), which writes the checkpoint."""
    import subprocess
    import sys

    payload = json.dumps({"model": model_name, "cfg": asdict(cfg), "kw": kw, "rebuild": rebuild,
                          "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, "-m", "lab_utils.prune", payload], capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SparsityError(f"pruning {model_name} ({cfg.method}, {cfg.pattern}, {cfg.sparsity:g}) in a "
                            f"separate process failed: {tail[0]}")


def _child_main(payload: str) -> None:
    args = json.loads(payload)
    torch.set_num_threads(int(args["threads"]))
    cfg = args["cfg"]
    pruned_model(args["model"], cfg["method"], cfg["sparsity"], cfg["pattern"], cfg["scope"], cfg["nsamples"],
                 cfg["seqlen"], cfg["seed"] or 0, cfg["owl"], cfg["calibration"], progress=False,
                 rebuild=args["rebuild"], **args["kw"])


def check_output_dir(out: str | Path) -> Path:
    """A folder that may be (re)written: absent, empty, or one written here
    before (it has our manifest). Anything else would be replaced: refuse."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / io.MANIFEST).is_file())):
        raise SparsityError(f"{out} exists and is not a model folder written here; "
                            f"choose a new --out folder (it would be replaced)")
    return out


def save_pretrained(lm: LoadedModel, out: str | Path) -> Path:
    """A complete model folder (safetensors, tokenizer, feature extractor) that
    loads like any other: ``load_model(out)``."""
    out = check_output_dir(out)
    with io.atomic_dir(out) as tmp:
        lm.model.save_pretrained(tmp)
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(tmp)
        if lm.feature_extractor is not None:
            lm.feature_extractor.save_pretrained(tmp)
    return out


if __name__ == "__main__":  # the child of pruned_model(separate_process=True)
    import sys

    _child_main(sys.argv[1])
