"""The perplexity protocol: batched window losses equal model(labels=...) one by one."""

import math

import pytest
import torch

from lab_utils.core import data
from lab_utils.core.evaluation import perplexity as P
from lab_utils.core.models import load_model


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("batch_tokens", [16, 48, 1000])
def test_batched_window_losses_equal_the_labels_loss(tiny_dirs, kind, batch_tokens):
    lm = load_model(str(tiny_dirs[kind]))
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(7, 60, (5, 16), generator=g)
    got = P.window_losses(lm.model, windows, batch_tokens=batch_tokens)
    with torch.no_grad():
        want = torch.stack([lm.model(input_ids=w[None], labels=w[None]).loss for w in windows])
    assert got.shape == (5,)
    assert torch.allclose(got, want, atol=1e-5)
    assert P.perplexity(lm.model, windows) == pytest.approx(math.exp(float(want.mean())), rel=1e-5)


def test_perplexity_is_exp_of_the_mean_window_loss():
    class Fixed(torch.nn.Module):
        """A 'model' whose loss per window is known: window i predicts with logits i*x."""

        def forward(self, input_ids, use_cache=False):
            b, n = input_ids.shape
            scale = input_ids[:, :1, None].float()
            logits = scale * torch.nn.functional.one_hot(input_ids, 8).float()
            return type("Out", (), {"logits": logits.roll(-1, dims=1)})()

    windows = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 1]])
    losses = P.window_losses(Fixed(), windows)
    assert losses[0] != losses[1]
    assert P.perplexity(Fixed(), windows) == pytest.approx(math.exp(float(losses.mean())))


def test_evaluate_uses_the_nyt_windows_and_caches(tiny_dirs, cache_with_data):
    lm = load_model(str(tiny_dirs["llama"]))
    r = P.evaluate(lm, seqlen=32, n_windows=3, cache_key="k1")
    assert r["corpus"] == "nyt" and r["windows"] == 3 and r["seqlen"] == 32
    windows = data.eval_windows(lm.tokenizer, 32, 3, "nyt")
    assert r["perplexity"] == pytest.approx(P.perplexity(lm.model, windows))
    assert r["perplexity"] > 1
    for p in lm.model.parameters():  # a changed model, same key: the cached number comes back
        p.data.zero_()
    assert P.evaluate(lm, seqlen=32, n_windows=3, cache_key="k1") == r
    assert P.evaluate(lm, seqlen=32, n_windows=3, cache_key="k2") != r


def test_perplexity_refuses_a_non_decoder(tiny_dirs):
    lm = load_model(str(tiny_dirs["bert"]))
    with pytest.raises(ValueError, match="decoder-only"):
        P.evaluate(lm, seqlen=16, n_windows=2)


def test_token_windows_are_tokenized_once_and_equal_the_protocol(tiny_dirs, cache_with_data, monkeypatch):
    lm = load_model(str(tiny_dirs["llama"]))
    ev = data.token_windows(lm.tokenizer, "eval", 3, 32)
    cal = data.token_windows(lm.tokenizer, "calibration", 4, 16, seed=1)
    assert torch.equal(ev, data.eval_windows(lm.tokenizer, 32, 3, "nyt"))
    assert torch.equal(cal, data.calibration_windows(lm.tokenizer, 4, 16, 1, "movie-reviews"))
    monkeypatch.setattr(data, "_token_ids", lambda *a: pytest.fail("tokenized again"))
    assert data.token_windows(lm.tokenizer, "eval", 3, 32, seed=7) is ev  # the seed is not an eval key
    assert data.token_windows(lm.tokenizer, "calibration", 4, 16, seed=1) is cal
    r = P.evaluate(lm, seqlen=32, n_windows=3)  # evaluation reads the same windows
    assert r["perplexity"] == pytest.approx(P.perplexity(lm.model, ev))
