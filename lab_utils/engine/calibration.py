"""Calibration for the engine: the batches (text windows, or packed speech for Whisper) and the
layer-sequential plumbing (inputs captured per block, input statistics per layer, propagation)."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.profiler import record_function

from lab_utils.core import data, models, sparsify
from lab_utils.core.device import model_device
from lab_utils.core.models import ENCODER_DECODER, LoadedModel
from lab_utils.core.sparsify import SparsityError
from lab_utils.engine.config import (
    BATCH_TOKENS,
    CPU_FORWARD_TOKENS,
    SPEECH_PER_WINDOW,
    default_calibration,
)


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
    """No key/value cache: a block run twice on captured inputs would append to it. Some
    models (Switch) take ``use_cache`` through ``**kwargs`` only."""
    params = inspect.signature(model.forward).parameters
    takes = "use_cache" in params or (getattr(model.config, "use_cache", False)
                                      and any(p.kind == p.VAR_KEYWORD for p in params.values()))
    return {"use_cache": False} if takes else {}


def calibration_batches(lm: LoadedModel, nsamples: int, seqlen: int, seed: int = 0,
                        corpus: str | None = None, batch_tokens: int = BATCH_TOKENS) -> list[dict]:
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
        return _speech_batches(lm, nsamples, seed, batch_tokens)
    ctx = models.context_length(model.config)
    if seqlen > ctx:
        raise SparsityError(f"seqlen {seqlen} exceeds the context of {lm.spec.name} ({ctx} tokens)")
    corpus = corpus or default_calibration(lm)
    windows = data.token_windows(lm.tokenizer, "calibration", nsamples, seqlen, seed, corpus)
    bs = max(1, batch_tokens // seqlen)
    out = []
    for i in range(0, windows.shape[0], bs):
        w = windows[i:i + bs]
        inputs = {"input_ids": w}
        if lm.family == ENCODER_DECODER:
            inputs["decoder_input_ids"] = _shift_right(w, model.config)
        out.append({"inputs": inputs, "masks": {}})
    return out


def _shift_right(ids: torch.Tensor, config) -> torch.Tensor:
    start = config.decoder_start_token_id
    start = config.bos_token_id if start is None else start
    out = ids.new_empty(ids.shape)
    out[:, 1:] = ids[:, :-1]
    out[:, 0] = start
    return out


def _speech_batches(lm: LoadedModel, nsamples: int, seed: int, batch_tokens: int) -> list[dict]:
    cfg = lm.model.config
    sentences = data.calibration_sentences(nsamples, seed)
    # Whisper's encoder always reads 30 s: one short sentence per window would
    # be mostly padding, so the statistics would come mostly from silence (and
    # cost four times the compute). Consecutive sentences share a window.
    texts, audio = data.pack(sentences, data.speech(sentences), SPEECH_PER_WINDOW)
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
    where = model_device(model)  # the host for the offloading engine; a model's own device else
    try:
        for b in batches:
            try:
                with record_function("lab::capture"):
                    model(**to_device(b["inputs"], where), **_model_kwargs(model))
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


def _map_tensors(obj, fn):
    """``obj`` with ``fn`` applied to every tensor inside it (tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple | list):
        return type(obj)(_map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def to_device(obj, device: torch.device, *, copy: bool = False):
    """``obj`` with every tensor inside it on ``device``; ``copy=True`` copies
    even a tensor already there (the offload path on the CPU)."""
    return _map_tensors(obj, lambda t: t.to(device, copy=copy))


def chunks_to(chunks: list[Chunk], device: torch.device, dtype: torch.dtype, *, copy: bool = False) -> None:
    """Put the calibration activations on ``device``; the hidden states are
    kept in ``dtype`` (half the memory in bfloat16), everything else as it is
    (masks and position embeddings: autocast casts them where it computes)."""
    for c in chunks:
        hidden = c.hidden.to(device, copy=copy)
        c.hidden = hidden.to(dtype) if hidden.is_floating_point() else hidden
        c.args = to_device(c.args, device, copy=copy)
        c.kwargs = to_device(c.kwargs, device, copy=copy)
        c.token_mask = to_device(c.token_mask, device, copy=copy)


# --------------------------------------------------------------------------- statistics
class _StopBlock(Exception):
    pass


@record_function("lab::statistics_update")
def _increment(x: torch.Tensor, token_mask: torch.Tensor | None, kind: str) -> tuple[torch.Tensor, int]:
    """One chunk's contribution to a layer input's statistic, and its token count
    (padding tokens, where ``token_mask`` says so, left out)."""
    X = x.reshape(-1, x.shape[-1])
    if token_mask is not None and tuple(x.shape[:-1]) == tuple(token_mask.shape):
        X = X[token_mask.reshape(-1)]
    X = X.float()
    # statistics in float32 even inside a bfloat16 autocast forward: X^T X in bf16
    # (8 bits of mantissa) loses the small eigenvalues SparseGPT's inverse needs
    with torch.autocast(X.device.type, enabled=False):
        inc = sparsify.gram(X) if kind == "hessian" else (X * X).sum(dim=0)
    return inc, X.shape[0]


def _batch_slice(obj, a: int, b: int, batch: int):
    """``obj`` with every tensor that has a batch dimension (2-D or more, ``batch`` rows
    first: attention masks, encoder states) cut to rows a:b; shared tensors (position
    embeddings with one row, 1-D positions) as they are."""
    return _map_tensors(obj, lambda t: t[a:b] if t.dim() >= 2 and t.shape[0] == batch else t)


def slices(c: Chunk, forward_tokens: int | None = None) -> list[Chunk]:
    """``c`` cut into slices of about ``forward_tokens`` tokens (whole samples), for
    the forward passes; ``None``: :data:`~lab_utils.engine.config.CPU_FORWARD_TOKENS`
    on a CPU, the whole chunk on an accelerator."""
    if forward_tokens is None:
        forward_tokens = CPU_FORWARD_TOKENS if c.hidden.device.type == "cpu" else 0
    batch = c.hidden.shape[0]
    per = max(1, forward_tokens // max(1, c.hidden[0].numel() // c.hidden.shape[-1])) if forward_tokens else batch
    if per >= batch:
        return [c]
    return [Chunk(c.hidden[a:a + per], _batch_slice(c.args, a, a + per, batch),
                  _batch_slice(c.kwargs, a, a + per, batch),
                  None if c.token_mask is None else c.token_mask[a:a + per])
            for a in range(0, batch, per)]


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _ExpertInputs(TorchFunctionMode):
    """Sees the input of every product with one expert's slice of a fused parameter, as the
    experts' eager loop computes them (``linear(x, gate_up_proj[e])``, or gpt-oss's
    ``x @ gate_up_proj[e]``), and hands it to ``record(name, x)``: the tokens the router sent
    to that expert, and for the down projection that expert's own activations."""

    PRODUCTS = (F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)

    def __init__(self, layers: dict[str, models.ExpertMatrix], record):
        super().__init__()
        self.record = record
        self.params: dict[int, tuple[torch.Tensor, dict[int, str]]] = {}
        self.width = {name: em.matrix().shape[1] for name, em in layers.items()}
        for name, em in layers.items():
            W = em.weight
            self.params.setdefault(W.untyped_storage().data_ptr(), (W, {}))[1][em.expert] = name

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.PRODUCTS and len(args) > 1 and isinstance(args[1], torch.Tensor):
            W = args[1]
            hit = self.params.get(W.untyped_storage().data_ptr())
            if hit is not None and W.dim() == 2:
                name = hit[1].get((W.storage_offset() - hit[0].storage_offset()) // hit[0].stride(0))
                if name is not None:
                    if args[0].shape[-1] != self.width[name]:
                        raise SparsityError(f"{name}: its experts module multiplies it in a layout the "
                                            f"engine does not know; it cannot be pruned")
                    self.record(name, args[0])
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _eager_experts(layers: dict[str, models.ExpertMatrix], record):
    """Fused experts run their eager loop, one product per expert (what :class:`_ExpertInputs`
    sees), instead of transformers' default that multiplies every expert at once."""
    if not layers:
        yield
        return
    # the config each experts module reads its implementation from (that one only, not its sub-configs)
    configs = {id(em.experts.config): em.experts.config for em in layers.values()
               if hasattr(getattr(em.experts, "config", None), "_experts_implementation_internal")}
    saved = {k: c._experts_implementation_internal for k, c in configs.items()}
    try:
        for c in configs.values():
            c._experts_implementation_internal = "eager"
        with _ExpertInputs(layers, record):
            yield
    finally:
        for k, c in configs.items():
            c._experts_implementation_internal = saved[k]


@torch.no_grad()
def collect_statistics(block: nn.Module, layers: dict[str, nn.Module], chunks: list[Chunk],
                       kind: str, propagate: bool = False) -> dict[str, dict]:
    """Input statistics of each layer of ``block`` over every calibration token.

    ``kind="norm"``: per-input-feature sums of squares (Wanda); ``kind="hessian"``: sums of
    x x^T (SparseGPT). Layers that read the same input tensor (q/k/v, gate/up) share one
    computation. An expert's matrices (per-expert layers, or an
    :class:`~lab_utils.core.models.ExpertMatrix` of fused experts) see the tokens the router
    sends that expert, and none if it sends none. Without ``propagate`` the forward stops once
    every layer has been seen (the pruned block recomputes the outputs anyway); with it, the
    chunks' hidden states are replaced by the block's outputs. Each chunk runs in
    :func:`slices`, whose inputs are joined again before the statistic, so the sums are those
    of one call, bit for bit (an expert's inputs come out of products over the tokens routed
    to it in each slice, which may differ from one call's in the last bits).

    Returns ``{name: {"sum": tensor, "count": tokens, "input": i}}``; layers with the same
    ``i`` read the same input (so their statistics are equal).
    """
    stats = {name: {"sum": None, "count": 0, "input": None} for name in layers}
    fused = {n: m for n, m in layers.items() if isinstance(m, models.ExpertMatrix)}
    hooked = {n: m for n, m in layers.items() if n not in fused}
    # an expert's layers read tokens that vary from slice to slice (or none): each keeps its
    # own pieces and its own input (no inverse shared), and the forward runs to its end
    experts = {n for n in layers if models.expert_of(n)}
    for name in experts:
        stats[name]["input"] = name
    stop = not propagate and not experts
    # per chunk: each input's tensors from the slices ("pieces", by number in call order) and
    # which input each layer read; per slice: the inputs' ids (-> number) and the layers seen
    state: dict = {}

    def record(name, x):
        state["expert_pieces"].setdefault(name, []).append(x)

    def make_hook(name):
        def hook(_module, args):
            x = args[0]
            if name in experts:
                record(name, x)
                return
            number = state["ids"].setdefault(id(x), len(state["ids"]))
            if number == len(state["pieces"]):
                state["pieces"].append([])
            if len(state["pieces"][number]) < state["slice"] + 1:
                state["pieces"][number].append(x)  # holding x keeps its id unique
            stats[name]["input"] = state["inputs_of"][name] = number
            state["seen"].add(name)
            if stop and len(state["seen"]) == len(hooked):
                raise _StopBlock

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in hooked.items()]
    try:
        for c in chunks:
            state["pieces"], state["inputs_of"], state["expert_pieces"], outputs = [], {}, {}, []
            for k, part in enumerate(slices(c)):
                state.update(ids={}, seen=set(), slice=k)
                try:
                    with record_function("lab::statistics_pass"), _eager_experts(fused, record):
                        out = block(part.hidden, *part.args, **part.kwargs)
                    if propagate:
                        outputs.append(_block_output(out).to(c.hidden.dtype))
                except _StopBlock:
                    pass
            increments = [_increment(_joined(xs), c.token_mask, kind) for xs in state["pieces"]]
            state["pieces"] = None
            for name, number in state["inputs_of"].items():
                _add(stats[name], *increments[number])
            for name, xs in state.pop("expert_pieces").items():
                _add(stats[name], *_increment(_joined(xs), None, kind))
            if propagate:
                c.hidden = _joined(outputs)
    finally:
        for h in handles:
            h.remove()
        state.clear()
    return stats


def _add(st: dict, inc: torch.Tensor, n: int) -> None:
    st["sum"] = inc.clone() if st["sum"] is None else st["sum"].add_(inc)
    st["count"] += n


@torch.no_grad()
def propagate(block: nn.Module, chunks: list[Chunk]) -> None:
    """Replace each chunk's hidden states by the block's outputs (computed in :func:`slices`)."""
    for c in chunks:  # kept in the activations' dtype (an autocast block may return float32)
        with record_function("lab::propagate"):
            outs = [_block_output(block(p.hidden, *p.args, **p.kwargs)).to(c.hidden.dtype)
                    for p in slices(c)]
            c.hidden = _joined(outs)
