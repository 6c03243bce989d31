"""The five concepts of the lab, each as small functions that notebook 01 calls.

* sparsification: zeros in tensors that keep their shape (the engine lives in
  :mod:`lab_utils.engine.prune`; :mod:`.measure` counts zeros, bytes and seconds);
* :mod:`.structured`: pruning that removes whole MLP neurons, so tensors shrink;
* :mod:`.quantize`: fewer bits per weight (int8 per channel, torch dynamic int8,
  4-bit round-to-nearest in groups);
* :mod:`.distill`: a small student trained on a teacher's soft targets;
* :mod:`.moe`: MoEfication, an MLP split into experts of which a token runs a few.
"""


def check_parameters(structured_sparsities, quant_group_sizes, distill_temperature, distill_alpha,
                     moe_experts, moe_active_fractions, timing_reps) -> None:
    """Check notebook 01's own parameters (those whose rule their name does not
    imply), before any work; one :class:`lab_utils.report.params.ParamError` naming the fix."""
    from lab_utils.report.params import ParamError

    def positive_int(name, v):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ParamError(f"{name}: {v!r} must be a positive integer")

    if not structured_sparsities or any(not 0 < float(s) < 1 for s in structured_sparsities):
        raise ParamError(f"structured_sparsities: {structured_sparsities!r} must be a non-empty list "
                         f"of fractions of MLP neurons to remove, each in (0, 1), e.g. [0.25, 0.5]")
    if not quant_group_sizes:
        raise ParamError("quant_group_sizes: give at least one 4-bit group size, e.g. [32, 64]")
    for g in quant_group_sizes:
        positive_int("quant_group_sizes", g)
        if g % 2:
            raise ParamError(f"quant_group_sizes: {g} must be even (two 4-bit codes per byte), e.g. 32")
    if not float(distill_temperature) > 0:
        raise ParamError(f"distill_temperature: {distill_temperature!r} must be > 0, e.g. 2.0")
    if not 0 <= float(distill_alpha) <= 1:
        raise ParamError(f"distill_alpha: {distill_alpha!r} must be in [0, 1] (the weight of the "
                         f"soft targets; 1 = soft targets only)")
    positive_int("moe_experts", moe_experts)
    positive_int("timing_reps", timing_reps)
    for f in moe_active_fractions:
        k = float(f) * moe_experts
        if not 0 < float(f) <= 1 or abs(k - round(k)) > 1e-9:
            raise ParamError(f"moe_active_fractions: {f!r} x {moe_experts} experts is not a whole "
                             f"number of experts; use multiples of 1/{moe_experts} in (0, 1]")
