"""The lab's evaluate-format metric modules, on inputs with known answers."""

import math

import pytest
import torch
import torch.nn.functional as F

from lab_utils.core.metrics import METRICS, load_metric, metric_path


def test_every_metric_module_loads_by_path_offline():
    for name in METRICS:
        assert (metric_path(name) / f"{name}.py").is_file()
        assert load_metric(name).name == name


def test_metric_modules_keep_one_import_per_line():
    # evaluate parses a module's imports line by line (see shared/OFFLINE.md)
    for name in METRICS:
        for line in (metric_path(name) / f"{name}.py").read_text().splitlines():
            if line.startswith(("import ", "from ")):
                assert "," not in line.split(" import ")[-1] and ";" not in line, line


def test_unknown_metric_names_the_shipped_ones():
    with pytest.raises(ValueError, match="accuracy, f1, wer, perplexity"):
        load_metric("bleu")


def test_wer_of_a_known_edit():
    wer = load_metric("wer")
    # one substitution in six reference words
    out = wer.compute(predictions=["the cat sat on a mat"], references=["the cat sat on the mat"])
    assert out["wer"] == pytest.approx(1 / 6)
    assert (out["substitutions"], out["deletions"], out["insertions"]) == (1, 0, 0)
    # pooled over the corpus: (1 deletion + 2 insertions) / (4 + 2) words
    out = wer.compute(predictions=["a b c", "x y z w"], references=["a b c d", "x y"])
    assert (out["deletions"], out["insertions"], out["reference_words"]) == (1, 2, 6)
    assert out["wer"] == pytest.approx(3 / 6)
    assert wer.compute(predictions=["same words"], references=["same words"])["wer"] == 0.0


def test_wer_can_exceed_one_and_refuses_empty_references():
    wer = load_metric("wer")
    assert wer.compute(predictions=["a a a a"], references=["b"])["wer"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="at least one word"):
        wer.compute(predictions=["x"], references=["  "])


def test_accuracy_and_f1_of_a_known_confusion():
    # TP=3, FN=2, FP=1, TN=4
    refs = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    preds = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    assert load_metric("accuracy").compute(predictions=preds, references=refs)["accuracy"] == pytest.approx(0.7)
    precision, recall = 3 / 4, 3 / 5
    f1 = load_metric("f1").compute(predictions=preds, references=refs)["f1"]
    assert f1 == pytest.approx(2 * precision * recall / (precision + recall))
    # the negative class: TP=4, FP=2, FN=1
    f1_neg = load_metric("f1").compute(predictions=preds, references=refs, pos_label=0)["f1"]
    assert f1_neg == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))


def test_f1_of_a_classifier_that_never_says_positive_is_zero():
    assert load_metric("f1").compute(predictions=[0, 0, 0], references=[1, 0, 1])["f1"] == 0.0


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    vocab = 37
    targets = torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(3, 11, vocab)  # every token equally likely
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    out = load_metric("perplexity").compute(losses=losses.tolist())
    assert out["perplexity"] == pytest.approx(vocab)
    assert out["tokens"] == 33
    assert out["perplexities"] == pytest.approx([vocab] * 3)


def test_perplexity_pools_tokens_and_accepts_log_likelihoods():
    ppl = load_metric("perplexity")
    out = ppl.compute(losses=[[1.0, 3.0], [2.0]])
    assert out["perplexity"] == pytest.approx(math.exp(2.0))  # (1 + 3 + 2) / 3 tokens
    assert out["perplexities"] == pytest.approx([math.exp(2.0), math.exp(2.0)])
    same = ppl.compute(losses=[[-1.0, -3.0], [-2.0]], kind="log_likelihood")
    assert same["perplexity"] == pytest.approx(out["perplexity"])
    with pytest.raises(ValueError, match="negative loss"):
        ppl.compute(losses=[[-1.0]])
