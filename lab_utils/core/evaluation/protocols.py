"""Named evaluation protocols: how many windows of how many tokens a perplexity reads.

A perplexity depends on the text it is measured on: 4 windows of 256 tokens
and 64 windows of 512 give different numbers for the same model, both right.
The lab measures under three protocols, chosen by how many models a step
evaluates and how long it may take:

=========  =======  ======  ==============================================
name       windows  tokens  used by
=========  =======  ======  ==============================================
quick            4     256  notebook 01's concept demos (each variant once)
sweep            8     256  notebooks 03 and 04 (every pruned checkpoint)
reference       64     512  ``python -m benchmarks``, ``python -m lab_utils perplexity``
=========  =======  ======  ==============================================

A number is labelled with its protocol's name (:func:`label`), and with the
actual size when a parameter overrode it ("quick, overridden: 2 x 64"), so two
numbers compare only when their labels match. Calibration (``nsamples`` x
``seqlen``) is not part of a protocol: it belongs to the pruned checkpoint,
which any protocol can measure.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{what}: {value!r} must be a positive integer, or {FROM_PROTOCOL} for the "
                             f"{p.name} protocol's own ({p.size()})")
    return eval_windows or p.eval_windows, eval_seqlen or p.eval_seqlen


def label(name: str, eval_windows: int = FROM_PROTOCOL, eval_seqlen: int = FROM_PROTOCOL) -> str:
    """What a perplexity measured this way is labelled with: the protocol's name,
    or "NAME, overridden: K x L" when the effective size is not the protocol's."""
    p = get(name)
    windows, seqlen = resolve(name, eval_windows, eval_seqlen)
    if (windows, seqlen) == (p.eval_windows, p.eval_seqlen):
        return p.name
    return f"{p.name}, overridden: {windows} x {seqlen}"
