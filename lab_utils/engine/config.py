"""The pruning configuration: one validated object for the engine, the cache and the child process."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from torch import nn

from lab_utils.core import files, sparsify
from lab_utils.core.models import (
    LoadedModel,
    ModelSpec,
)
from lab_utils.core.sparsify import SparsityError

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

    from lab_utils.core.models import embedded_model_dir

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


# --------------------------------------------------------------------------- the cache
def cache_key(model_name: str, cfg: PruneConfig) -> str:
    return files.key_hash("pruned", ENGINE_VERSION, model_name, cfg.method, cfg.pattern, cfg.sparsity,
                       cfg.scope, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.owl, cfg.calibration)


def checkpoint_key(spec: ModelSpec, cfg: PruneConfig) -> str:
    """The cache key of ``cfg`` (resolved by :func:`resolve_config`) on a model;
    a local folder is keyed by its absolute path."""
    return cache_key(spec.name if spec.source != "local" else os.path.abspath(spec.location), cfg)
