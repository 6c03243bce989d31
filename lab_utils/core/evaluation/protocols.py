"""Named evaluation protocols: how many windows of how many tokens a perplexity reads.

4 windows of 256 tokens and 64 of 512 give different numbers for the same
model, both right, so every perplexity is labelled with its protocol
(:func:`label`; "quick, overridden: 2 x 64" when a parameter changed the size)
and two numbers compare only when their labels match:

=========  =======  ======  ==============================================
name       windows  tokens  used by
=========  =======  ======  ==============================================
quick            4     256  notebook 01's concept demos (each variant once)
sweep            8     256  notebooks 03 and 04 (every pruned checkpoint)
reference       64     512  ``python -m benchmarks``, ``python -m lab_utils perplexity``
=========  =======  ======  ==============================================

Calibration (``nsamples`` x ``seqlen``) belongs to the pruned checkpoint, not
to a protocol. :class:`EvalConfig` is the one evaluation config: the size of
every benchmark, passed whole to the benchmarks.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

from lab_utils.core.checks import whole_number
from lab_utils.core.evaluation import zeroshot

FROM_PROTOCOL = 0  # a window count or length of 0 in a notebook's parameters: the protocol's own


@dataclass(frozen=True)
class Protocol:
    name: str
    eval_windows: int  # non-overlapping windows of the evaluation text, the first K
    eval_seqlen: int  # tokens per window
    used_by: str  # where the lab uses it (said once in the write-up)

    def size(self) -> str:
        return f"{self.eval_windows} x {self.eval_seqlen}"


PROTOCOLS = {p.name: p for p in [
    Protocol("quick", 4, 256, "notebook 01's concept demos"),
    Protocol("sweep", 8, 256, "the pruning sweep and the benchmarks of notebooks 03 and 04"),
    Protocol("reference", 64, 512, "`python -m benchmarks` and `python -m lab_utils perplexity`"),
]}


def get(name: str) -> Protocol:
    """The protocol called ``name``; an unknown name is refused in one line naming the valid ones."""
    try:
        return PROTOCOLS[name]
    except (KeyError, TypeError):
        raise ValueError(f"protocol: {name!r} is not an evaluation protocol; choose one of "
                         f"{', '.join(PROTOCOLS)} (lab_utils.core.evaluation.protocols)") from None


def resolve(name: str, eval_windows: int = FROM_PROTOCOL, eval_seqlen: int = FROM_PROTOCOL) -> tuple[int, int]:
    """The (windows, tokens per window) a step measures with: the protocol's,
    unless a positive override replaces one of them."""
    p = get(name)
    for what, value in (("eval_windows", eval_windows), ("eval_seqlen", eval_seqlen)):
        try:
            whole_number(what, value, minimum=0)
        except ValueError:
            raise ValueError(f"{what}: {value!r} must be a positive integer, or {FROM_PROTOCOL} for the "
                             f"{p.name} protocol's own ({p.size()})") from None
    return eval_windows or p.eval_windows, eval_seqlen or p.eval_seqlen


def label(name: str, eval_windows: int = FROM_PROTOCOL, eval_seqlen: int = FROM_PROTOCOL) -> str:
    """What a perplexity measured this way is labelled with: the protocol's name,
    or "NAME, overridden: K x L" when the effective size is not the protocol's."""
    p = get(name)
    windows, seqlen = resolve(name, eval_windows, eval_seqlen)
    if (windows, seqlen) == (p.eval_windows, p.eval_seqlen):
        return p.name
    return f"{p.name}, overridden: {windows} x {seqlen}"


@dataclass(frozen=True)
class EvalConfig:
    """The size of every benchmark (notebook 04's parameters); each benchmark's
    cache key holds the fields it reads. Defaults: the sweep protocol's windows
    and the notebook's fast configuration."""

    eval_windows: int = 8  # perplexity: non-overlapping windows of the evaluation text
    eval_seqlen: int = 256  # tokens per window
    sentiment_examples: int = 128  # zero-shot: documents scored per task (a seeded sample)
    zeroshot_tasks: tuple[str, ...] = zeroshot.OFFLINE_TASKS  # lm-eval task names
    probe_train_examples: int = 2000  # probe head: training sentences (a seeded sample)
    probe_test_examples: int = 500  # probe: test sentences (a seeded sample)
    probe_max_length: int = 128  # tokens per sentence for the encoder
    wer_utterances: int = 64  # Whisper: synthesized NYT sentences
    wer_per_window: int = 1  # sentences packed into one 30 s clip (1: one clip per sentence)
    wer_batch_size: int = 32
    denoise_sentences: int = 64  # BART: sentences to reconstruct
    denoise_mask_ratio: float = 0.3
    denoise_poisson_lambda: float = 3.0
    seed: int = 0  # data split and corruption seed

    def __post_init__(self):
        """One clear line for a size that cannot work (0 windows, a mask ratio of 1 ...)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "zeroshot_tasks":  # a tuple, also when a parameter file gives a list
                try:
                    object.__setattr__(self, f.name, zeroshot.check_tasks(value, hub_available=True))
                except ValueError as e:
                    raise ValueError(f"{f.name}: {e}") from None
            elif isinstance(f.default, float):
                ratio = f.name == "denoise_mask_ratio"
                if (isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0
                        or (ratio and value >= 1)):
                    raise ValueError(f"{f.name}: {value!r} is not allowed; use "
                                     f"{'a fraction in (0, 1)' if ratio else 'a positive number'}")
            else:
                whole_number(f.name, value, minimum=0 if f.name == "seed" else 1)
