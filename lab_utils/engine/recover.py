"""Recovery: fine-tune a pruned model with its mask kept, from its dense teacher.

Every weight that pruning zeroed stays exactly zero: after each backward pass the gradients of
the pruned weights are zeroed (so AdamW's moments never move them) and after each optimizer step
the pruned weights are set to zero again (so nothing, not even a rounding, revives one). Only the
matrices the engine prunes train (:func:`~lab_utils.core.models.prunable_layers`, fused experts
included); embeddings, norms, biases, routers and the head stay the teacher's.

Three losses (``RecoveryConfig.loss``):

* ``kd``: knowledge distillation from the dense model, the KL divergence of the logits at a
  temperature T, scaled by T^2 (:func:`kd_loss`), plus ``hidden_weight`` times the per-block
  hidden-state loss normalized per layer (:func:`squarehead_loss`, Kurtic et al. 2023's
  SquareHead) when that is above 0;
* ``next-token``: the plain language-modelling loss (:func:`next_token_loss`), the ablation;
* ``lora``: LoRA adapters (``peft``, the library the Wanda repository's ``lora_ft`` uses) trained
  with the kd loss on the prunable linear layers. A plain ``merge_and_unload()`` adds the dense
  product B·A to each weight and so undoes the pruning; the lab's adapters are **masked**: their
  product is multiplied by the mask's complement in the forward pass and at the merge
  (:func:`masked_lora_class`), so the merged model has exactly the pruned model's zeros and no
  extra bytes. :func:`lora_merge_zero_fractions` measures both merges. Fused expert parameters
  are not adapted (they stay as pruned).

:func:`recover` is the loop (batches in, a :class:`RecoveryRun` out, resumable from a state
file); :func:`recovered_model` adds the checkpoint cache, as :func:`~lab_utils.engine.checkpoints.
pruned_model` does for pruning.

The learning rate follows ``RecoveryConfig.schedule`` (:func:`lr_factor`: constant, or a short
linear warmup then a linear or cosine decay to 0 over the steps). The forward passes run in
``RecoveryConfig.dtype`` by autocast; ``auto`` is bfloat16 wherever the hardware runs it natively
(a GPU, or a CPU with AMX or AVX512-BF16, :func:`training_dtype`) and float32 elsewhere.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lab_utils.core import files, memo
from lab_utils.core.checks import whole_number
from lab_utils.core.device import cpu_bf16, dtype_name, model_device, resolve_device, resolve_dtype
from lab_utils.core.models import LoadedModel, load_model, prunable_layers, resolve
from lab_utils.core.progress import tqdm
from lab_utils.engine import checkpoints
from lab_utils.engine.config import PruneConfig, checkpoint_key

RECOVERY_VERSION = 2  # part of every recovered checkpoint's key: bump when recovery results change
LOSSES = ("kd", "next-token", "lora")
SCHEDULES = ("constant", "linear", "cosine")
WARMUP = 0.1  # the share of the steps a decaying schedule warms up over (linearly, at least one step)
STATE_EVERY = 10  # steps between two saves of the resumable state ...
STATE_SECONDS = 120.0  # ... or seconds, whichever comes first: a CPU step of a real model takes many
STATE_FORMAT = 1


class RecoveryError(ValueError):
    """Bad recovery input, in one line that names the fix."""


# --------------------------------------------------------------------------- the configuration
@dataclass(frozen=True)
class RecoveryConfig:
    """Every setting that changes the recovered weights, checked and normalized when the config
    is made (one :class:`RecoveryError` naming the fix).

    ``loss``: kd | next-token | lora; ``steps`` optimizer steps of ``batch_size`` sequences of
    ``seqlen`` tokens; AdamW at learning rate ``lr`` (no weight decay, no schedule);
    ``temperature`` of the kd loss; ``hidden_weight`` of the per-block hidden-state loss added
    to kd (0: off); ``lora_rank`` of the adapters; ``seed`` of the adapters' initialization;
    ``device`` (auto | cpu | cuda | cuda:N | mps) and ``dtype`` of the forward passes (auto:
    float32 on the CPU, bfloat16 on a GPU, by autocast: the trained weights stay float32).

    Settings a loss ignores are set to None so that they do not split the cache (temperature
    and hidden_weight for next-token, lora_rank except for lora). Normalizing is idempotent:
    ``RecoveryConfig(**asdict(cfg)) == cfg``.
    """

    loss: str = "kd"
    steps: int = 64
    batch_size: int = 4
    seqlen: int = 256
    lr: float = 1e-4
    schedule: str = "constant"
    temperature: float | None = 2.0
    hidden_weight: float | None = 0.0
    lora_rank: int | None = 8
    seed: int = 0
    device: str | None = "cpu"
    dtype: str | None = "auto"

    def __post_init__(self):
        for name, value in _normalized(self).items():
            object.__setattr__(self, name, value)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seqlen

    @property
    def distils(self) -> bool:
        """Whether the loss reads the teacher (kd, and lora, which trains with kd)."""
        return self.loss != "next-token"

    def replace(self, **changes) -> RecoveryConfig:
        return dataclasses.replace(self, **changes)


def _positive(name: str, value, minimum: float = 0.0, strict: bool = True) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= minimum if strict else value < minimum):
        raise RecoveryError(f"{name} must be a number {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


def _normalized(c: RecoveryConfig) -> dict:
    if c.loss not in LOSSES:
        raise RecoveryError(f"unknown recovery loss {c.loss!r}: use one of {', '.join(LOSSES)}")
    steps = whole_number("steps", c.steps, error=RecoveryError)
    batch_size = whole_number("batch_size", c.batch_size, error=RecoveryError)
    seqlen = whole_number("seqlen", c.seqlen, minimum=2, error=RecoveryError)
    lr = _positive("lr", c.lr)
    if c.schedule not in SCHEDULES:
        raise RecoveryError(f"schedule {c.schedule!r} is not an lr schedule: use one of {', '.join(SCHEDULES)}")
    seed = whole_number("seed", c.seed, minimum=0, error=RecoveryError)
    distils = c.loss != "next-token"
    temperature = _positive("temperature", c.temperature) if distils else None
    hidden_weight = _positive("hidden_weight", c.hidden_weight, strict=False) if distils else None
    lora_rank = whole_number("lora_rank", c.lora_rank, error=RecoveryError) if c.loss == "lora" else None
    try:
        dev = resolve_device(c.device)
        dt = dtype_name(training_dtype(c.dtype, dev))
    except ValueError as e:
        raise RecoveryError(str(e)) from None
    return dict(steps=steps, batch_size=batch_size, seqlen=seqlen, lr=lr, temperature=temperature,
                hidden_weight=hidden_weight, lora_rank=lora_rank, seed=seed, device=str(dev), dtype=dt)


def training_dtype(name: str | None, device: torch.device | str) -> torch.dtype:
    """The forward dtype of a recovery: ``auto`` (or None) is bfloat16 where it runs natively,
    a GPU or a CPU with AMX or AVX512-BF16 (:func:`~lab_utils.core.device.cpu_bf16`; there
    autocast makes a CPU step much faster and distils as well as float32: benchmarks/README.md),
    float32 on any other CPU (emulated bfloat16 is slower than float32); a named dtype as
    :func:`~lab_utils.core.device.resolve_dtype` checks it."""
    device = torch.device(device)
    if (name is None or name == "auto") and device.type == "cpu":
        return torch.bfloat16 if cpu_bf16() else torch.float32
    return resolve_dtype(name, device)


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """The multiple of the peak learning rate at optimizer step ``step`` (0-based) of ``steps``:
    1 for ``constant``; for ``linear`` and ``cosine`` a linear warmup over the first
    :data:`WARMUP` of the steps (at least one: the first step already moves the weights) and
    then a linear or cosine decay that would reach 0 one step after the last. A function of the
    step alone, so a resumed run replays it."""
    if schedule not in SCHEDULES:
        raise RecoveryError(f"schedule {schedule!r} is not an lr schedule: use one of {', '.join(SCHEDULES)}")
    if schedule == "constant":
        return 1.0
    warmup = max(1, math.ceil(WARMUP * steps))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup + 1) / (steps - warmup + 1)  # in (0, 1): the last step keeps a little
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def recovery_settings(cfg: RecoveryConfig) -> dict:
    """The settings a cache key is made of: every field, the device by its kind."""
    return {**asdict(cfg), "device": torch.device(cfg.device).type}


# --------------------------------------------------------------------------- masks
def W_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: W_mask}`` for every matrix the engine prunes (fused experts included):
    True where the weight is pruned (exactly 0), out x in as :class:`PrunableLayer` shows it."""
    return {pl.name: (pl.weight == 0).cpu() for pl in prunable_layers(model)}


def _prunable_parameters(model: nn.Module) -> dict[int, nn.Parameter]:
    """Every parameter holding prunable matrices, once each (by id): a fused expert parameter
    holds every expert's matrices, a GPT-2 Conv1D stores in x out."""
    return {id(pl.module.weight): pl.module.weight for pl in prunable_layers(model)}


def _pruned_parameters(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, mask of its zeros, in the parameter's own layout) for each of
    :func:`_prunable_parameters`."""
    return [(p, p.detach() == 0) for p in _prunable_parameters(model).values()]


def zero_fraction(model: nn.Module) -> float:
    """The fraction of the prunable matrices' weights that are exactly 0."""
    params = list(_prunable_parameters(model).values())
    total = sum(p.numel() for p in params)
    # numel - count_nonzero: no mask materialized (seconds for a 100M-weight model otherwise)
    return sum(p.numel() - int(torch.count_nonzero(p.detach())) for p in params) / total if total else 0.0


# --------------------------------------------------------------------------- losses
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions at ``temperature``, times T^2
    (Hinton et al. 2015: keeps the gradients' scale when T changes), averaged over the positions
    (every leading dimension; where ``mask`` is nonzero when given)."""
    if temperature <= 0:
        raise RecoveryError(f"temperature {temperature!r} must be > 0 (e.g. 2.0)")
    vocab = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        s, t = s[keep], t[keep]
    log_p_s = F.log_softmax(s.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(t.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


def squarehead_loss(student_hidden, teacher_hidden) -> torch.Tensor:
    """SquareHead (Kurtic et al. 2023, "Sparse Fine-tuning for Inference Acceleration of Large
    Language Models"): per block, the mean squared difference of the student's and the
    teacher's hidden states divided by the teacher's mean square, ``MSE(s, t) / MSE(t, 0)``;
    averaged over the blocks. The division puts every block on one scale, whatever the size
    of its activations (a block with large outliers would otherwise drown the others)."""
    pairs = list(zip(student_hidden, teacher_hidden, strict=True))
    if not pairs:
        raise RecoveryError("no hidden states to match: the model returned none (set hidden_weight 0)")
    return torch.stack([F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12)
                        for s, t in pairs]).mean()


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each position's prediction of the next token (where ``mask`` is 0, a
    padding position, nothing is predicted)."""
    targets = input_ids[:, 1:].clone()
    if mask is not None:
        targets[mask[:, 1:] == 0] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100)


def _tokens(batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token ids a batch's logits predict, and their mask: the decoder's for an
    encoder-decoder model (``decoder_input_ids``), else ``input_ids``."""
    if "decoder_input_ids" in batch:
        return batch["decoder_input_ids"], batch.get("decoder_attention_mask")
    return batch["input_ids"], batch.get("attention_mask")


def _hidden_states(out) -> tuple:
    """Each block's output: the hidden states transformers returns, less the first of each
    stack, the embeddings' output (not trained, equal in student and teacher)."""
    if getattr(out, "hidden_states", None) is not None:
        return tuple(out.hidden_states)[1:]
    return tuple(out.encoder_hidden_states or ())[1:] + tuple(out.decoder_hidden_states or ())[1:]


def default_step_loss(student_out, teacher_out, batch: dict, cfg: RecoveryConfig) -> torch.Tensor:
    """The loss of a model with logits: kd at ``cfg.temperature`` (+ ``hidden_weight`` x the
    SquareHead loss of the blocks' outputs), or next-token when ``cfg.loss`` says so."""
    if getattr(student_out, "logits", None) is None:
        raise RecoveryError("the model's output has no logits (an encoder?): pass a step_loss that "
                            "compares its outputs, e.g. the encoder task's")
    ids, mask = _tokens(batch)
    if not cfg.distils:
        if "labels" in batch and getattr(student_out, "loss", None) is not None:
            return student_out.loss
        return next_token_loss(student_out.logits, ids, mask)
    loss = kd_loss(student_out.logits, teacher_out.logits, cfg.temperature, mask)
    if cfg.hidden_weight:
        loss = loss + cfg.hidden_weight * squarehead_loss(_hidden_states(student_out), _hidden_states(teacher_out))
    return loss


# --------------------------------------------------------------------------- LoRA
LORA_ALPHA_PER_RANK = 2  # lora_alpha = 2 x rank (Wanda's lora_ft: r=8, alpha=16), so the scale is 2


@functools.cache
def masked_lora_class() -> type:
    """peft's LoRA linear layer whose update B·A is multiplied by the complement of the base
    weight's W_mask (the zeros it had when the adapter was added), in the forward pass and at
    the merge, so the model it merges into keeps exactly the pruned zeros and gains no byte.
    ``masked = False`` gives peft's plain LoRA back (what :func:`lora_merge_zero_fractions`
    measures). A class made on first use: importing peft takes seconds (it imports much of
    transformers), and only the lora loss needs it."""
    from peft.tuners.lora.layer import Linear as LoraLinear  # deferred: see the docstring

    class MaskedLoraLinear(LoraLinear):
        def __init__(self, base_layer, adapter_name, config, **kwargs):
            conv1d = not isinstance(base_layer, nn.Linear)  # GPT-2's Conv1D stores in x out
            super().__init__(base_layer, adapter_name, config=config, is_target_conv_1d_layer=conv1d, **kwargs)
            self.fan_in_fan_out = conv1d
            self.masked = True
            self.register_buffer("W_keep", self.get_base_layer().weight.detach() != 0, persistent=False)

        def get_delta_weight(self, adapter) -> torch.Tensor:
            delta = super().get_delta_weight(adapter)
            return delta * self.W_keep.to(delta.dtype) if self.masked else delta

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.disable_adapters or self.merged or not self.masked:
                return super().forward(x, *args, **kwargs)
            # one product with the weight as merging would make it (the parameter's layout):
            # adding a second product x (B·A ∘ keep)^T would cost a dense matmul more each way
            base = self.get_base_layer()
            W = base.weight
            for adapter in self.active_adapters:
                if adapter in self.lora_A:
                    W = W + self.get_delta_weight(adapter).to(W.dtype)
            return F.linear(x, W.t() if self.fan_in_fan_out else W, base.bias)

    return MaskedLoraLinear


def with_lora(model: nn.Module, cfg: RecoveryConfig):
    """``model`` (changed in place) with masked LoRA adapters (:func:`masked_lora_class`) of rank
    ``cfg.lora_rank`` on its prunable linear layers (GPT-2's Conv1D included; fused expert
    parameters are not adapted), as a peft model whose only trainable parameters are the adapters."""
    # deferred: see masked_lora_class (and transformers is loaded by now: the model is one)
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = [pl.name for pl in prunable_layers(model) if isinstance(pl.module, nn.Module)]
    if not targets:
        raise RecoveryError(f"{type(model).__name__} has no prunable linear layer to put LoRA adapters on; "
                            f"use loss 'kd'")
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=LORA_ALPHA_PER_RANK * cfg.lora_rank, lora_dropout=0.0,
                      target_modules=targets, bias="none")
    masked = masked_lora_class()
    lora._register_custom_module({nn.Linear: masked, Conv1D: masked})  # peft's API for custom LoRA layers
    torch.manual_seed(cfg.seed)  # the A matrices' initialization
    return get_peft_model(model, lora)


def adapter_parameters(peft_model: nn.Module) -> int:
    return sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_" in n)


def lora_merge_zero_fractions(peft_model) -> dict:
    """The pitfall, measured on copies of a model with trained adapters: the fraction of the
    prunable weights that are 0 after peft's plain ``merge_and_unload()`` (the product B·A added
    whole) and after the lab's masked merge."""
    out = {}
    for name, masked in (("zero_fraction_plain_merge", False), ("zero_fraction_masked_merge", True)):
        twin = copy.deepcopy(peft_model)
        for m in twin.modules():
            if isinstance(m, masked_lora_class()):
                m.masked = masked
        out[name] = zero_fraction(twin.merge_and_unload())
        del twin
    return out


# --------------------------------------------------------------------------- the loop
@dataclass
class RecoveryRun:
    """What a recovery did: the training loss per step, the tokens and seconds it took, the
    sparsity of the prunable matrices before and after (equal: the mask is kept), and for LoRA
    the adapters' size and the zero fractions of the two merges."""

    loss: str
    steps: int
    tokens: int = 0  # tokens the student read (padding excluded)
    seconds: float = 0.0  # wall clock of the training, resumed parts added up
    history: list = field(default_factory=list)  # (step, training loss)
    sparsity_before: float = 0.0
    sparsity_after: float = 0.0
    trainable_params: int = 0
    lora: dict | None = None  # adapter_params, zero_fraction_plain_merge, zero_fraction_masked_merge
    resumed_at: int = 0  # the step a resumed run started from (0: from the start)
    device: str = "cpu"
    dtype: str = "float32"
    model: str = ""
    family: str = ""
    prune_key: str = ""
    key: str = ""
    checkpoint: str | None = None
    from_cache: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RecoveryRun:
        run = cls(**json.loads(text))
        run.history = [tuple(h) for h in run.history]
        return run


StepLoss = Callable[[object, object, dict, RecoveryConfig], torch.Tensor]


def _to(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """A batch on the student's device, its floating tensors (speech features) in its dtype."""
    def moved(v):
        if not torch.is_tensor(v):
            return v
        return v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)

    return {k: moved(v) for k, v in batch.items()}


def _batch_tokens(batch: dict) -> int:
    ids, mask = _tokens(batch)
    return int(mask.sum()) if mask is not None else ids.numel()


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _fingerprint(cfg: RecoveryConfig, trainable: list[tuple[str, nn.Parameter]]) -> str:
    return files.key_hash(recovery_settings(cfg), [(n, list(p.shape)) for n, p in trainable])


def _save_state(path: Path, fingerprint: str, trainable, opt, run: RecoveryRun, step: int) -> None:
    state = {"format": STATE_FORMAT, "fingerprint": fingerprint, "step": step,
             "params": {n: p.detach().cpu() for n, p in trainable}, "optimizer": opt.state_dict(),
             "history": [list(h) for h in run.history], "tokens": run.tokens, "seconds": run.seconds,
             "rng": torch.get_rng_state()}
    with files.atomic_path(path) as tmp:
        torch.save(state, tmp)


@torch.no_grad()
def _load_state(path: Path, fingerprint: str, trainable, opt, run: RecoveryRun) -> int:
    """Restore a saved state into the parameters, the optimizer and ``run``; the step it was
    saved at (0 when there is none, or it belongs to other settings or is unreadable)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        return 0
    if state.get("format") != STATE_FORMAT or state.get("fingerprint") != fingerprint:
        return 0
    for n, p in trainable:
        p.copy_(state["params"][n])
    opt.load_state_dict(state["optimizer"])
    run.history = [tuple(h) for h in state["history"]]
    run.tokens, run.seconds = state["tokens"], state["seconds"]
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def recover(student: nn.Module, teacher: nn.Module | None, batches: Iterable[dict], cfg: RecoveryConfig, *,
            step_loss: StepLoss | None = None, state_path: str | Path | None = None,
            state_every: int | None = None) -> RecoveryRun:
    """Train ``student`` (changed in place) for ``cfg.steps`` steps on ``batches`` (dicts passed
    as ``model(**batch)``, one per step) with its W_mask fixed: every pruned weight is exactly 0
    after every step. ``step_loss(student_out, teacher_out, batch, cfg)`` is the family's loss
    (default :func:`default_step_loss`); the teacher runs only when the loss reads it.

    With ``state_path`` the trainable weights, the optimizer, the step, the history and the RNG
    are saved there (atomically) every ``state_every`` steps (default :data:`STATE_EVERY`) or
    :data:`STATE_SECONDS`, whichever comes first, and a run that finds a state of the
    same settings continues from it, skipping the batches already used: an interrupted and
    resumed run gives the weights of an uninterrupted one. The caller removes the file.
    Models stay where they are; the batches go to the student's device; forward passes run in
    ``cfg.dtype`` by autocast. For ``lora`` the masked adapters are merged into the weights
    before returning.
    """
    custom = step_loss is not None
    step_loss = step_loss or default_step_loss
    reads_teacher = custom or cfg.distils
    if reads_teacher and teacher is None:
        raise RecoveryError(f"loss {cfg.loss!r} distils from the dense model: pass the teacher")
    device = model_device(student)
    dtype = resolve_dtype(cfg.dtype, device)
    masks = _pruned_parameters(student)  # before any step: the pruned model's zeros
    total = sum(m.numel() for _, m in masks)
    run = RecoveryRun(cfg.loss, cfg.steps, device=str(device), dtype=dtype_name(dtype),
                      sparsity_before=sum(int(torch.count_nonzero(m)) for _, m in masks) / total if total else 0.0)
    student.eval()  # dropout off: the steps are few, and a resumed run must replay them exactly
    if teacher is not None:
        teacher.eval()
    if cfg.loss == "lora":
        model = with_lora(student, cfg)
    else:
        model = student
        keep = {id(p) for p, _ in masks}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    run.trainable_params = sum(p.numel() for _, p in trainable)
    opt = torch.optim.AdamW([p for _, p in trainable], lr=cfg.lr, weight_decay=0.0)
    extra = {"output_hidden_states": True} if cfg.distils and cfg.hidden_weight else {}
    fingerprint = _fingerprint(cfg, trainable)
    state_path = Path(state_path) if state_path is not None else None
    state_every = state_every or STATE_EVERY
    start = _load_state(state_path, fingerprint, trainable, opt, run) if state_path and state_path.is_file() else 0
    run.resumed_at = start
    it = iter(batches)
    for _ in range(start):  # the batches the saved steps used
        if next(it, None) is None:
            raise RecoveryError(f"the batches ran out before step {start}, where the saved state resumes")
    t0 = saved = time.perf_counter()
    seconds0 = run.seconds
    for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"recover ({cfg.loss})"):
        batch = next(it, None)
        if batch is None:
            raise RecoveryError(f"the batches ran out after {step} of {cfg.steps} steps: give at least "
                                f"steps={cfg.steps} batches")
        batch = _to(batch, device, next(student.parameters()).dtype)
        with _autocast(device, dtype):
            student_out = model(**batch, **extra)
            teacher_out = None
            if reads_teacher:
                with torch.no_grad():
                    teacher_out = teacher(**batch, **extra)
            loss = step_loss(student_out, teacher_out, batch, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:  # the schedule, from the step alone: a resumed run replays it
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.schedule)
        with torch.no_grad():
            for p, m in masks:
                if p.grad is not None:
                    p.grad.masked_fill_(m, 0)
            opt.step()
            for p, m in masks:
                p.masked_fill_(m, 0)
        run.history.append((step + 1, float(loss.detach())))
        run.tokens += _batch_tokens(batch)
        run.seconds = seconds0 + time.perf_counter() - t0
        due = (step + 1) % state_every == 0 or time.perf_counter() - saved > STATE_SECONDS
        if state_path is not None and due and step + 1 < cfg.steps:
            _save_state(state_path, fingerprint, trainable, opt, run, step + 1)
            saved = time.perf_counter()
    if cfg.loss == "lora":
        run.lora = {"adapter_params": adapter_parameters(model), **lora_merge_zero_fractions(model)}
        model.merge_and_unload()  # the masked merge, into ``student``
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()
    run.sparsity_after = zero_fraction(student)
    return run


# --------------------------------------------------------------------------- the checkpoint cache
def recovered_dir(model_slug: str, prune_cfg: PruneConfig, cfg: RecoveryConfig, key: str) -> Path:
    pat = prune_cfg.pattern.replace(":", "of")
    name = f"{model_slug}-{prune_cfg.method}-{pat}-{prune_cfg.sparsity:g}-{cfg.loss}-{cfg.steps}-{key}"
    return files.cache_dir() / "recovered" / name


def recovery_key(prune_key: str, cfg: RecoveryConfig, task) -> str:
    """The cache key of a recovery: the pruned checkpoint's key, every recovery setting, and the
    task (its type and every field: the training data and the family's loss)."""
    return files.key_hash("recovered", RECOVERY_VERSION, prune_key, recovery_settings(cfg),
                          type(task).__name__, memo.key_value(task))


def recovered_model(model: str | LoadedModel, prune_cfg: PruneConfig, cfg: RecoveryConfig, task, *,
                    rebuild: bool = False) -> tuple[LoadedModel, RecoveryRun]:
    """The model pruned as ``prune_cfg`` says (:func:`~lab_utils.engine.checkpoints.pruned_model`)
    and recovered as ``cfg`` says from its dense teacher, or the cached checkpoint of the same
    recovery (under ``cache_dir()/recovered/``, stored as a pruned one: mask + values, checksummed,
    with the run in ``report.json``). A killed recovery resumes from its state file.

    ``task`` is a frozen dataclass: its fields key the cache, ``task.batches(lm, cfg)`` yields
    ``cfg.steps`` batches for the loaded pruned model ``lm``, and its optional ``step_loss`` is the
    family's loss. Training runs on ``cfg.device``; the model returned is on the CPU in float32,
    as a pruned model is, whether trained now or read from the cache.
    """
    if prune_cfg.sparsity == 0:
        raise RecoveryError("sparsity 0 is the dense model: there is nothing to recover")
    given = model if isinstance(model, LoadedModel) else None
    spec = given.spec if given else resolve(model)
    prune_key = checkpoint_key(spec, prune_cfg, given.model.config if given else None)
    key = recovery_key(prune_key, cfg, task)
    folder = recovered_dir(spec.slug, prune_cfg, cfg, key)
    if not rebuild and files.verify_dir(folder):  # the recovered weights replace every prunable one: no pruning
        lm = dataclasses.replace(given, model=copy.deepcopy(given.model)) if given else load_model(spec)
        checkpoints.load_checkpoint(lm.model, folder)
        run = RecoveryRun.from_json((folder / checkpoints.REPORT_FILE).read_text())
        run.from_cache = True
        return lm, run
    dense = given or load_model(spec)
    lm, _ = checkpoints.pruned_model(dense, prune_cfg)  # a pruned copy: the dense model stays the teacher
    if model_device(dense.model) == torch.device(cfg.device):
        teacher = dense.model  # autocast gives its forward passes cfg.dtype
    else:
        teacher = load_model(spec, device=cfg.device, dtype=cfg.dtype).model
    del dense
    lm.model.to(cfg.device)
    state = folder.with_name(folder.name + ".state")
    try:
        run = recover(lm.model, teacher, task.batches(lm, cfg), cfg, step_loss=getattr(task, "step_loss", None),
                      state_path=state)
    finally:
        lm.model.to("cpu")
    run.model, run.family, run.prune_key, run.key = spec.name, spec.family, prune_key, key
    run.checkpoint = str(folder)
    with files.atomic_dir(folder) as tmp:
        checkpoints.save_checkpoint(lm.model, tmp)
        (tmp / checkpoints.REPORT_FILE).write_text(run.to_json())
    state.unlink(missing_ok=True)
    return lm, run
