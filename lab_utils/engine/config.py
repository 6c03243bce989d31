"""The pruning configuration and its cache key.

:class:`PruneConfig` holds every setting that changes the pruned weights
(method, ``sparsity_ratio``, the N:M pattern, scope, calibration ``nsamples``
and ``seqlen``, seed, OWL and its lambda and M, the calibration corpus and
batch size). :func:`make_config` checks and normalizes it once; the engine,
the checkpoint cache and the child process that builds a checkpoint all take
that one object. :func:`resolve_config` fills in the defaults that depend on
the model (calibration length and corpus), and :func:`checkpoint_key` is the
one place that turns a model and a configuration into a cache key.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from lab_utils.core import files, models, sparsify
from lab_utils.core.device import dtype_name, resolve_device, resolve_dtype
from lab_utils.core.models import (
    LoadedModel,
    ModelSpec,
    embedded_model_dir,
)
from lab_utils.core.sparsify import SparsityError

ENGINE_VERSION = 3  # part of every cache key: bump when pruning results change (2: packed speech windows;
#   3: SparseGPT's shared inverse Hessian and X^T X from its upper blocks move its last bits)


DEFAULT_NSAMPLES = 64




BATCH_TOKENS = 8192  # calibration tokens pushed through a block at once
# On a CPU a block runs each batch in slices of this many tokens: the norms, rotary embeddings
# and activations of a slice stay in the cache (a forward measured 17% faster in 1024-token
# slices than in one 8192-token call). The slices' outputs are bit for bit those of one call,
# and the statistics still sum over the whole batch, so the masks do not change. An accelerator
# runs the whole batch at once.
CPU_FORWARD_TOKENS = 1024


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
    # OWL's lambda and M (None without OWL) and the calibration tokens pushed through a block at
    # once (None for the uncalibrated methods): in the cache key only when they differ from the
    # defaults, so the keys of the default settings stay what they always were
    owl_lambda: float | None = None
    owl_m: float | None = None
    batch_tokens: int | None = None
    # where the blocks are pruned and the dtype of their forward passes: in the key only off the
    # CPU/float32 defaults (a bfloat16 forward changes the statistics; a GPU's float32 kernels
    # sum in another order, so even its float32 masks may differ in the last bits)
    device: str = "cpu"
    dtype: str = "float32"

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
                owl: bool = False, calibration: str | None = None, *, owl_lambda: float = OWL_LAMBDA,
                owl_m: float = OWL_M, batch_tokens: int = BATCH_TOKENS, device: str = "cpu",
                dtype: str = "auto") -> PruneConfig:
    """Check every argument; raise one :class:`SparsityError` naming the fix.

    ``method``: random | magnitude | wanda | sparsegpt; ``pattern``:
    "unstructured" or "N:M"; ``scope``: row | layer | global for magnitude
    and random (default layer), row | layer for wanda (default row); ``owl``:
    non-uniform sparsity per block from the activation outliers (unstructured
    only), with OWL's ``owl_lambda`` and ``owl_m``. Calibrated methods use
    ``nsamples`` windows of ``seqlen`` tokens (default: the model's context for
    hub presets, 512 otherwise) from ``calibration`` (default: C4 for hub
    presets, movie reviews otherwise), ``batch_tokens`` at a time, block by
    block on ``device`` (auto | cpu | cuda | cuda:N | mps) with forward
    passes in ``dtype`` (auto: float32 on the CPU, bfloat16 on a GPU).
    """
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
    dev = resolve_device(device)  # checked before any work, also for the dense model
    dt = dtype_name(resolve_dtype(dtype, dev))
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
    if calibrated and (isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int)
                       or batch_tokens <= 0):
        raise SparsityError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")
    if owl and not (_number(owl_lambda) and owl_lambda >= 0 and _number(owl_m) and owl_m > 0):
        raise SparsityError(f"OWL needs owl_lambda >= 0 and owl_m > 0, got {owl_lambda!r} and {owl_m!r}")
    # the uncalibrated methods run on the host, so the device cannot split their cache
    dev, dt = (str(dev), dt) if calibrated else ("cpu", "float32")
    return PruneConfig(method, s, pattern, scope, nsamples, seqlen, seed, owl, calibration,
                       owl_lambda=float(owl_lambda) if owl else None, owl_m=float(owl_m) if owl else None,
                       batch_tokens=batch_tokens if calibrated else None, device=dev, dtype=dt)


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def default_seqlen(lm: LoadedModel) -> int:
    """Calibration length: the model's context for hub presets (as in the
    papers), else :data:`~lab_utils.core.models.DEFAULT_SEQLEN` capped by it."""
    return models.default_seqlen(lm.spec, lm.model.config)


def default_calibration(lm: LoadedModel) -> str:
    """C4 for hub models (as in the papers), movie reviews otherwise."""
    return _default_calibration(lm.spec)


def _default_calibration(spec: ModelSpec) -> str:
    return "c4" if spec.source == "hub" else "movie-reviews"


def hf_config(spec: ModelSpec):
    """A model's Hugging Face config, read without loading its weights."""
    from transformers import AutoConfig  # deferred: importing transformers takes seconds

    location = embedded_model_dir(spec.name)[0] if spec.source == "embedded" else spec.location
    return AutoConfig.from_pretrained(location, local_files_only=spec.source != "hub")


def resolve_config(spec: ModelSpec, cfg: PruneConfig, config) -> PruneConfig:
    """``cfg`` with the calibration defaults filled in (length and corpus, from
    the model's config alone): the configuration a checkpoint is keyed on.
    Whisper calibrates on whole 30 s windows, so it has no ``seqlen``."""
    if not cfg.calibrated:
        return cfg
    seqlen = None if getattr(config, "model_type", "") == "whisper" else (
        cfg.seqlen or models.default_seqlen(spec, config))
    return PruneConfig(**{**asdict(cfg), "seqlen": seqlen,
                          "calibration": cfg.calibration or _default_calibration(spec)})


# --------------------------------------------------------------------------- the cache
KEY_FIELDS = ("method", "sparsity", "pattern", "scope", "nsamples", "seqlen", "seed", "owl", "calibration")

_DEFAULTS = {"owl_lambda": OWL_LAMBDA, "owl_m": OWL_M, "batch_tokens": BATCH_TOKENS}


def key_settings(cfg: PruneConfig) -> dict:
    """The settings a cache key is made of: the nine that every key has always
    held, plus OWL's lambda and M and the calibration batch where they differ
    from the defaults (so existing keys stay valid)."""
    out = {k: getattr(cfg, k) for k in KEY_FIELDS}
    out.update({k: getattr(cfg, k) for k, default in _DEFAULTS.items()
                if getattr(cfg, k) is not None and getattr(cfg, k) != default})
    if cfg.dtype != "float32":
        out["dtype"] = cfg.dtype
    if torch.device(cfg.device).type != "cpu":  # the kind of device, not which one of them
        out["device"] = torch.device(cfg.device).type
    return out


def checkpoint_key(spec: ModelSpec, cfg: PruneConfig, config=None) -> str:
    """The cache key of the pruning ``cfg`` of a model: the name of its
    checkpoint and the key its evaluations are cached under.

    ``cfg`` is resolved first (:func:`resolve_config`, from ``config``, the
    model's Hugging Face config, read from its files when not given). A local
    folder is keyed by its absolute path, except the dense model (sparsity 0),
    which has always been keyed by the name as written."""
    if cfg.calibrated:
        cfg = resolve_config(spec, cfg, hf_config(spec) if config is None else config)
    local = spec.source == "local" and cfg.sparsity > 0
    return _key(os.path.abspath(spec.location) if local else spec.name, cfg)


def _key(model_name: str, cfg: PruneConfig) -> str:
    extra = {k: v for k, v in key_settings(cfg).items() if k not in KEY_FIELDS}
    return files.key_hash("pruned", ENGINE_VERSION, model_name, cfg.method, cfg.pattern, cfg.sparsity,
                          cfg.scope, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.owl, cfg.calibration,
                          *([extra] if extra else []))
