"""Recovery after pruning on tiny models (random weights: the mask invariant, the losses, LoRA's
merge, resume and the cache, not quality)."""

import copy
import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from tiny_models import build_tiny, build_zoo

from lab_utils.core.models import load_model, prunable_layers
from lab_utils.engine import recover as rc
from lab_utils.engine.config import PruneConfig
from lab_utils.engine.recover import RecoveryConfig, RecoveryError

TINY = dict(batch_size=2, seqlen=16, lr=1e-2, dtype="float32")  # float32: the same steps on every CPU


def half_pruned(model):
    """``model`` with the smaller half of every prunable matrix zeroed (fused experts included)."""
    with torch.no_grad():
        for pl in prunable_layers(model):
            W = pl.weight
            pl.set_weight(W * (W.abs() > W.abs().flatten().kthvalue(W.numel() // 2).values))
    return model


def token_batches(n, batch_size=2, seqlen=16, seed=0, decoder_start=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, 64, (batch_size, seqlen), generator=g)
        batch = {"input_ids": ids}
        if decoder_start is not None:
            batch["decoder_input_ids"] = torch.cat([torch.full((batch_size, 1), decoder_start), ids[:, :-1]], 1)
        out.append(batch)
    return out


def whisper_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_features": torch.randn(1, 80, 3000, generator=g),
             "decoder_input_ids": torch.randint(3, 64, (1, 8), generator=g)} for _ in range(n)]


def embedding_loss(student_out, teacher_out, batch, cfg):
    """An encoder's loss: match the dense model's token states (a task's step_loss)."""
    return F.mse_loss(student_out.last_hidden_state, teacher_out.last_hidden_state)


def snapshot(model):
    return {pl.name: pl.weight.detach().clone() for pl in prunable_layers(model)}


# --------------------------------------------------------------------------- the configuration
@pytest.mark.parametrize("change,match", [
    (dict(loss="sft"), "unknown recovery loss 'sft'"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=2.5), "steps must be"),
    (dict(batch_size=True), "batch_size must be"),
    (dict(seqlen=1), "seqlen must be an integer >= 2"),
    (dict(lr=0), "lr must be a number > 0"),
    (dict(lr=float("nan")), "lr must be"),
    (dict(schedule="step"), "schedule 'step' is not an lr schedule"),
    (dict(temperature=-1.0), "temperature must be a number > 0"),
    (dict(hidden_weight=-0.5), "hidden_weight must be a number >= 0"),
    (dict(loss="lora", lora_rank=0), "lora_rank must be a positive integer"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(device="tpu"), "device 'tpu'"),
    (dict(dtype="float8"), "dtype 'float8'"),
])
def test_bad_settings_are_refused_in_one_line(change, match):
    with pytest.raises(RecoveryError) as e:
        RecoveryConfig(**change)
    assert len(str(e.value).splitlines()) == 1 and re.search(match, str(e.value)), str(e.value)


def test_settings_a_loss_ignores_do_not_split_the_cache():
    cfg = RecoveryConfig("next-token", temperature=5.0, hidden_weight=1.0, lora_rank=4)
    assert (cfg.temperature, cfg.hidden_weight, cfg.lora_rank) == (None, None, None)
    assert cfg == RecoveryConfig("next-token") == RecoveryConfig(**dataclasses.asdict(cfg))
    assert RecoveryConfig("kd").lora_rank is None and RecoveryConfig("lora").lora_rank == 8
    assert cfg.device == "cpu" and cfg.dtype == rc.dtype_name(rc.training_dtype("auto", "cpu"))
    assert RecoveryConfig(batch_size=3, seqlen=100).tokens_per_step == 300


# --------------------------------------------------------------------------- the losses
def test_losses():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    assert rc.kd_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="none").sum(-1)
    assert rc.kd_loss(s, t, 2.0).item() == pytest.approx(4 * kl.mean().item(), rel=1e-5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    assert rc.kd_loss(s, t, 2.0, mask).item() == pytest.approx(4 * kl[mask.bool()].mean().item(), rel=1e-5)
    assert rc.squarehead_loss([s, t], [s, t]).item() == 0.0
    # per block MSE(s, t) / MSE(t, 0), averaged: a block's scale does not weigh it
    expected = (F.mse_loss(s, t) / t.pow(2).mean() + 0) / 2
    assert rc.squarehead_loss([s, s], [t, s]).item() == pytest.approx(expected.item(), rel=1e-5)
    assert rc.squarehead_loss([100 * s], [100 * t]).item() == pytest.approx(rc.squarehead_loss([s], [t]).item(),
                                                                              rel=1e-5)
    assert rc.squarehead_loss([torch.zeros_like(t)], [t]).item() == pytest.approx(1.0)  # a dead block: 1

    model = build_tiny("llama")
    ids = token_batches(1)[0]["input_ids"]
    out = model(input_ids=ids, labels=ids)
    assert rc.next_token_loss(out.logits, ids).item() == pytest.approx(out.loss.item(), rel=1e-5)


# --------------------------------------------------------------------------- the mask invariant
FAMILIES = {  # model, batches, step_loss
    "decoder": (lambda: build_tiny("llama"), lambda: token_batches(3), None),
    "encoder": (lambda: build_tiny("bert"), lambda: token_batches(3), embedding_loss),
    "encoder-decoder": (lambda: build_tiny("whisper"), lambda: whisper_batches(3), None),
    "fused experts": (lambda: build_zoo("mixtral", num_hidden_layers=1)[0], lambda: token_batches(3), None),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_pruned_weight_stays_zero_after_training_steps(family):
    build, batches, step_loss = FAMILIES[family]
    teacher = build()
    student = half_pruned(copy.deepcopy(teacher))
    masks, before = rc.W_masks(student), snapshot(student)
    run = rc.recover(student, teacher, batches(), RecoveryConfig("kd", steps=3, **TINY), step_loss=step_loss)
    after = snapshot(student)
    assert all(torch.equal(rc.W_masks(student)[n], m) for n, m in masks.items())
    for name, W_mask in masks.items():
        assert W_mask.any() and (after[name][W_mask] == 0).all(), name
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the kept weights trained
    assert run.sparsity_before == run.sparsity_after == pytest.approx(0.5, abs=0.01)
    assert len(run.history) == 3 and run.tokens > 0 and run.trainable_params > 0
    # only the prunable matrices train: embeddings and the head are the teacher's
    emb = student.get_input_embeddings().weight
    assert torch.equal(emb, teacher.get_input_embeddings().weight)
    if family == "fused experts":
        experts = [pl for pl in prunable_layers(student) if "experts" in pl.name]
        assert experts and any(not torch.equal(before[pl.name], after[pl.name]) for pl in experts)


def test_forward_passes_run_in_the_configured_dtype_and_the_weights_stay_float32():
    teacher = build_tiny("llama")
    student = half_pruned(copy.deepcopy(teacher))
    masks = rc.W_masks(student)
    seen = []
    hook = student.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    run = rc.recover(student, teacher, token_batches(2), RecoveryConfig("kd", steps=2, **{**TINY, "dtype": "bfloat16"}))
    hook.remove()
    assert seen == [torch.bfloat16] * 2 and run.dtype == "bfloat16"
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert all(torch.equal(rc.W_masks(student)[n], m) for n, m in masks.items())


def test_a_recovery_lowers_the_training_loss():
    teacher = build_tiny("llama")
    student = half_pruned(copy.deepcopy(teacher))
    batch = token_batches(1)[0]
    for loss, drop in (("kd", 0.5), ("next-token", 0.98)):  # kd from near-uniform logits: tiny values
        s = copy.deepcopy(student)
        run = rc.recover(s, teacher, [batch] * 12, RecoveryConfig(loss, steps=12, **dict(TINY, lr=1e-3)))
        first, last = run.history[0][1], run.history[-1][1]
        assert last < drop * first, (loss, run.history)


def test_hidden_state_matching_is_added_to_kd():
    teacher = build_tiny("llama")
    student = half_pruned(copy.deepcopy(teacher))
    b = token_batches(1)
    plain = rc.recover(copy.deepcopy(student), teacher, b, RecoveryConfig("kd", steps=1, **TINY))
    both = rc.recover(copy.deepcopy(student), teacher, b, RecoveryConfig("kd", steps=1, hidden_weight=1.0, **TINY))
    assert both.history[0][1] > plain.history[0][1]


@pytest.mark.parametrize("schedule", rc.SCHEDULES)
def test_the_lr_schedule_warms_up_then_decays_towards_zero(schedule):
    steps = 20
    f = [rc.lr_factor(i, steps, schedule) for i in range(steps)]
    if schedule == "constant":
        assert f == [1.0] * steps
        return
    warmup = 2  # 10% of 20 steps
    assert f[:warmup] == pytest.approx([1 / 3, 2 / 3]) and max(f) == f[warmup] < 1.0
    assert all(a > b for a, b in zip(f[warmup:], f[warmup + 1:], strict=False)) and 0 < f[-1] < 0.06
    assert rc.lr_factor(0, 1, schedule) == 0.5  # one step: half the peak, never 0
    mid = rc.lr_factor(warmup - 1 + (steps - warmup + 1) // 2, steps, schedule)
    assert mid == pytest.approx(0.5, abs=0.05)


def test_the_schedule_sets_each_steps_lr(monkeypatch):
    teacher = build_tiny("llama")
    seen = []
    real = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (seen.append(self.param_groups[0]["lr"]),
                                                                         real(self, *a, **k))[1])
    rc.recover(half_pruned(copy.deepcopy(teacher)), teacher, token_batches(4),
               RecoveryConfig("kd", steps=4, schedule="linear", **TINY))
    assert seen == pytest.approx([TINY["lr"] * rc.lr_factor(i, 4, "linear") for i in range(4)])


def test_auto_trains_in_bfloat16_where_the_cpu_runs_it_natively(monkeypatch):
    monkeypatch.setattr(rc, "cpu_bf16", lambda: "AVX512-BF16")
    assert rc.training_dtype("auto", "cpu") == torch.bfloat16 == rc.training_dtype(None, "cuda")
    assert RecoveryConfig(dtype="auto").dtype == "bfloat16"
    assert rc.training_dtype("float32", "cpu") == torch.float32
    monkeypatch.setattr(rc, "cpu_bf16", lambda: None)  # AVX2 only: bfloat16 would be emulated, slower
    assert rc.training_dtype("auto", "cpu") == torch.float32 and RecoveryConfig().dtype == "float32"
    assert RecoveryConfig(dtype="auto") != RecoveryConfig(dtype="bfloat16")  # the dtype keys the checkpoint


def test_next_token_needs_no_teacher_and_kd_refuses_without_one():
    student = half_pruned(build_tiny("llama"))
    rc.recover(student, None, token_batches(1), RecoveryConfig("next-token", steps=1, **TINY))
    with pytest.raises(RecoveryError, match="pass the teacher"):
        rc.recover(student, None, token_batches(1), RecoveryConfig("kd", steps=1, **TINY))
    with pytest.raises(RecoveryError, match="ran out after 1 of 2 steps"):
        rc.recover(student, None, token_batches(1), RecoveryConfig("next-token", steps=2, **TINY))


# --------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # nn.Linear, and GPT-2's Conv1D (in x out)
def test_plain_lora_merge_densifies_and_the_masked_merge_keeps_the_zeros(kind):
    teacher = build_tiny(kind)
    student = half_pruned(copy.deepcopy(teacher))
    masks = rc.W_masks(student)
    run = rc.recover(student, teacher, token_batches(3), RecoveryConfig("lora", steps=3, lora_rank=2, **TINY))
    assert run.lora["zero_fraction_plain_merge"] < 0.01  # peft's merge_and_unload: dense again
    assert run.lora["zero_fraction_masked_merge"] == run.sparsity_before == run.sparsity_after
    assert run.trainable_params == run.lora["adapter_params"] > 0
    assert all(torch.equal(rc.W_masks(student)[n], m) for n, m in masks.items())
    assert not any("lora" in n for n, _ in student.named_parameters())  # merged and unloaded


def test_masked_lora_forward_is_the_merged_model():
    teacher = build_tiny("llama")
    student = half_pruned(copy.deepcopy(teacher))
    peft_model = rc.with_lora(student, RecoveryConfig("lora", lora_rank=2))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # peft starts B at 0: make the update nonzero
    ids = token_batches(1)[0]["input_ids"]
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
        assert torch.allclose(adapted, merged(input_ids=ids).logits, atol=1e-5)
    assert rc.zero_fraction(merged) == pytest.approx(0.5, abs=0.01)


# --------------------------------------------------------------------------- resume and the cache
@dataclasses.dataclass(frozen=True)
class TokenTask:
    """A decoder task on random token ids; ``calls`` and ``stop_after`` (not fields: not in the
    key) count the batches drawn and interrupt a run."""

    seed: int = 0

    def batches(self, lm, cfg):
        for i, b in enumerate(token_batches(cfg.steps, cfg.batch_size, cfg.seqlen, self.seed)):
            if CONTROL["stop_after"] is not None and i == CONTROL["stop_after"]:
                raise KeyboardInterrupt
            CONTROL["calls"] += 1
            yield b


CONTROL = {"stop_after": None, "calls": 0}


def test_an_interrupted_recovery_resumes_to_the_same_checkpoint_and_a_second_call_reads_it(tiny_dirs, tmp_cache,
                                                                                           monkeypatch):
    model, prune_cfg = str(tiny_dirs["llama"]), PruneConfig("magnitude", 0.5)
    cfg, task = RecoveryConfig("kd", steps=4, **TINY), TokenTask()
    CONTROL.update(stop_after=3, calls=0)
    with pytest.raises(KeyboardInterrupt):
        rc.recovered_model(model, prune_cfg, cfg, task)
    (state,) = (tmp_cache / "recovered").glob("*.state")
    CONTROL.update(stop_after=None)
    lm, run = rc.recovered_model(model, prune_cfg, cfg, task)
    assert run.resumed_at == 2 and not run.from_cache and not state.exists()  # saved every 2 steps
    assert [s for s, _ in run.history] == [1, 2, 3, 4]
    folder = tmp_cache / "recovered" / run.checkpoint.rsplit("/", 1)[-1]
    resumed = (folder / "pruned.safetensors").read_bytes()

    CONTROL["calls"] = 0
    with monkeypatch.context() as m:  # a cached recovery neither trains nor prunes
        m.setattr(rc.checkpoints, "pruned_model", lambda *a, **k: pytest.fail("pruned again"))
        cached, again = rc.recovered_model(model, prune_cfg, cfg, task)
    assert again.from_cache and CONTROL["calls"] == 0 and again.history == run.history
    assert all(torch.equal(a, b) for a, b in zip(snapshot(cached.model).values(), snapshot(lm.model).values(), strict=True))

    _, fresh = rc.recovered_model(model, prune_cfg, cfg, task, rebuild=True)
    assert fresh.resumed_at == 0 and CONTROL["calls"] == 4
    assert (folder / "pruned.safetensors").read_bytes() == resumed
    assert fresh.sparsity_after == fresh.sparsity_before == pytest.approx(0.5, abs=0.01)

    keys = {rc.recovery_key(run.prune_key, c, t) for c, t in [
        (cfg, task), (cfg.replace(lr=1e-3), task), (cfg.replace(steps=5), task), (cfg, TokenTask(seed=1))]}
    assert run.key in keys and len(keys) == 4  # every setting and the task key it


def test_a_loaded_dense_model_is_the_teacher_and_stays_dense(tiny_dirs, tmp_cache):
    CONTROL.update(stop_after=None)
    dense = load_model(str(tiny_dirs["llama"]))
    before = {n: p.detach().clone() for n, p in dense.model.named_parameters()}
    prune_cfg, cfg = PruneConfig("magnitude", 0.5), RecoveryConfig("kd", steps=2, **TINY)
    lm, run = rc.recovered_model(dense, prune_cfg, cfg, TokenTask())
    assert all(torch.equal(p, before[n]) for n, p in dense.model.named_parameters())
    assert lm.model is not dense.model and run.sparsity_after == pytest.approx(0.5, abs=0.01)
    _, again = rc.recovered_model(str(tiny_dirs["llama"]), prune_cfg, cfg, TokenTask())  # by name: the same key
    assert again.from_cache and again.key == run.key


def test_lora_resumes_to_the_same_weights(tmp_path):
    teacher = build_tiny("llama")
    pruned = half_pruned(copy.deepcopy(teacher))
    cfg = RecoveryConfig("lora", steps=4, lora_rank=2, **TINY)

    def interrupted(batches, at):
        for i, b in enumerate(batches):
            if i == at:
                raise KeyboardInterrupt
            yield b

    whole = copy.deepcopy(pruned)
    rc.recover(whole, teacher, token_batches(4), cfg)
    state, resumed = tmp_path / "lora.state", copy.deepcopy(pruned)
    with pytest.raises(KeyboardInterrupt):
        rc.recover(copy.deepcopy(pruned), teacher, interrupted(token_batches(4), 3), cfg, state_path=state)
    run = rc.recover(resumed, teacher, token_batches(4), cfg, state_path=state)
    assert run.resumed_at == 2
    assert all(torch.equal(a, b) for a, b in zip(snapshot(whole).values(), snapshot(resumed).values(), strict=True))


@pytest.fixture(autouse=True)
def _state_every_two_steps(monkeypatch):
    monkeypatch.setattr(rc, "STATE_EVERY", 2)
