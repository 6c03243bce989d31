"""The pruning configuration and its cache key.

:class:`PruneConfig` holds (checked and normalized) every setting that changes the pruned
weights; :func:`resolve_config` fills in the model's calibration defaults and
:func:`checkpoint_key` turns a model and a configuration into a cache key.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from lab_utils.core import files, models, sparsify
from lab_utils.core.checks import whole_number
from lab_utils.core.device import dtype_name, resolve_device, resolve_dtype
from lab_utils.core.models import LoadedModel, ModelSpec, embedded_model_dir
from lab_utils.core.sparsify import SparsityError

ENGINE_VERSION = 4  # part of every cache key: bump when pruning results change

DEFAULT_NSAMPLES = 64
BATCH_TOKENS = 8192  # calibration tokens pushed through a block at once
# On a CPU a block runs each batch in slices of this many tokens, whose activations stay in the
# cache (measured 17% faster than one 8192-token call); the outputs and statistics are bit for
# bit those of one call. An accelerator runs the whole batch at once.
CPU_FORWARD_TOKENS = 1024
SPEECH_PER_WINDOW = 4  # Whisper calibration: sentences packed into one 30 s window
OWL_LAMBDA = 0.08  # OWL's defaults for LLaMA (Yin et al. 2023)
OWL_M = 5.0
NATURAL_SCOPE = {"random": "layer", "magnitude": "layer", "wanda": "row", "sparsegpt": None}


@dataclass(frozen=True)
class PruneConfig:
    """Every setting that changes the pruned weights, checked and normalized
    when the config is made (one :class:`SparsityError` naming the fix).

    ``method``: random | magnitude | wanda | sparsegpt; ``sparsity``: the
    ``sparsity_ratio`` in [0, 1); ``pattern``: "unstructured" or "N:M";
    ``scope``: row | layer | global for magnitude and random (default layer),
    row | layer for wanda (default row); ``owl``: non-uniform sparsity per
    block from the activation outliers (unstructured only), with OWL's
    ``owl_lambda`` and ``owl_m``. Calibrated methods use ``nsamples`` windows
    of ``seqlen`` tokens (default: the model's context for hub presets, 512
    otherwise) from ``calibration`` (default: C4 for hub presets, movie
    reviews otherwise), ``batch_tokens`` at a time, block by block on
    ``device`` (auto | cpu | cuda | cuda:N | mps) with forward passes in
    ``dtype`` (auto: float32 on the CPU, bfloat16 on a GPU).

    Settings that a method ignores are set to None so that they do not split
    the cache; the uncalibrated methods run on the host in float32 whatever
    ``device`` says. Normalizing is idempotent: ``PruneConfig(**asdict(cfg)) == cfg``.
    """

    method: str
    sparsity: float
    pattern: str = sparsify.UNSTRUCTURED
    scope: str | None = None
    nsamples: int | None = DEFAULT_NSAMPLES
    seqlen: int | None = None
    seed: int | None = 0
    owl: bool = False
    calibration: str | None = None
    owl_lambda: float | None = OWL_LAMBDA
    owl_m: float | None = OWL_M
    batch_tokens: int | None = BATCH_TOKENS
    device: str = "cpu"
    dtype: str = "auto"

    def __post_init__(self):
        for name, value in _normalized(self).items():
            object.__setattr__(self, name, value)

    @property
    def prune_n(self) -> int:
        return sparsify.parse_pattern(self.pattern)[0]

    @property
    def prune_m(self) -> int:
        return sparsify.parse_pattern(self.pattern)[1]

    @property
    def calibrated(self) -> bool:
        return self.method in sparsify.CALIBRATED or self.owl

    def replace(self, **changes) -> PruneConfig:
        return dataclasses.replace(self, **changes)


def _normalized(c: PruneConfig) -> dict:
    """The fields of ``c`` checked and normalized (see :class:`PruneConfig`)."""
    method = c.method
    sparsify.check_method(method)
    s = sparsify.check_sparsity_ratio(c.sparsity)
    prune_n, prune_m = sparsify.parse_pattern(c.pattern)
    scope = c.scope
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
    owl = bool(c.owl)
    if owl and prune_n:
        raise SparsityError("OWL allocates unstructured sparsity across layers; an N:M pattern is "
                            "the same in every layer (use owl=False or pattern='unstructured')")
    if owl and scope == "global":
        raise SparsityError("OWL sets one sparsity per block; scope 'global' already ranks all "
                            "layers together (use one of them)")
    dev = resolve_device(c.device)  # checked before any work, also for the dense model
    dt = dtype_name(resolve_dtype(c.dtype, dev))
    if s == 0:  # the dense model: nothing else matters
        return dict(sparsity=0.0, pattern=sparsify.UNSTRUCTURED, scope=None, nsamples=None, seqlen=None,
                    seed=None, owl=False, calibration=None, owl_lambda=None, owl_m=None, batch_tokens=None,
                    device="cpu", dtype="float32")
    calibrated = method in sparsify.CALIBRATED or owl
    nsamples, seqlen, calibration, seed = c.nsamples, c.seqlen, c.calibration, c.seed
    if calibrated:
        try:
            whole_number("nsamples", nsamples, error=SparsityError)
        except SparsityError as e:
            raise SparsityError(f"{method}{' with OWL' if owl else ''} needs calibration data: {e}") from None
        if seqlen is not None:
            whole_number("seqlen", seqlen, minimum=2, error=SparsityError)
        whole_number("batch_tokens", c.batch_tokens, error=SparsityError)
    else:
        nsamples = seqlen = calibration = None
    drops_seed = method == "magnitude" and not owl
    if not (drops_seed and seed is None):  # None: already dropped by an earlier normalization
        whole_number("seed", seed, minimum=0, error=SparsityError)
    if owl and not (_number(c.owl_lambda) and c.owl_lambda >= 0 and _number(c.owl_m) and c.owl_m > 0):
        raise SparsityError(f"OWL needs owl_lambda >= 0 and owl_m > 0, got {c.owl_lambda!r} and {c.owl_m!r}")
    return dict(sparsity=s, pattern=sparsify.pattern_name(prune_n, prune_m), scope=scope, nsamples=nsamples,
                seqlen=seqlen, seed=None if drops_seed else seed, owl=owl, calibration=calibration,
                owl_lambda=float(c.owl_lambda) if owl else None, owl_m=float(c.owl_m) if owl else None,
                batch_tokens=c.batch_tokens if calibrated else None,
                # the uncalibrated methods run on the host, so the device cannot split their cache
                device=str(dev) if calibrated else "cpu", dtype=dt if calibrated else "float32")


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


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
    calibration = cfg.calibration or _default_calibration(spec)
    if (seqlen, calibration) == (cfg.seqlen, cfg.calibration):
        return cfg
    return cfg.replace(seqlen=seqlen, calibration=calibration)


def key_settings(cfg: PruneConfig) -> dict:
    """The settings a cache key is made of: every field of ``cfg``, the device
    by its kind (cuda, not cuda:1: any GPU of a kind gives the same masks)."""
    return {**dataclasses.asdict(cfg), "device": torch.device(cfg.device).type}


def checkpoint_key(spec: ModelSpec, cfg: PruneConfig, config=None) -> str:
    """The cache key of the pruning ``cfg`` of a model (its checkpoint's name and the key
    its evaluations are cached under), after :func:`resolve_config` with ``config`` (read
    from the model's files when not given). A local folder is keyed by its absolute path,
    except the dense model, which is keyed by the name as written."""
    if cfg.calibrated:
        cfg = resolve_config(spec, cfg, hf_config(spec) if config is None else config)
    local = spec.source == "local" and cfg.sparsity > 0
    name = os.path.abspath(spec.location) if local else spec.name
    return files.key_hash("pruned", ENGINE_VERSION, name, key_settings(cfg))
