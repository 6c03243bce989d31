"""Zero-shot accuracy through lm-evaluation-harness (lab_utils.core.evaluation.zeroshot):
the lab's task YAML loads offline with the lab's documents, lm-eval's choice
equals a direct log-likelihood computation on a tiny decoder, and a hub task
without the hub stops before any work."""

import datasets
import pytest
import torch

from lab_utils.core import data
from lab_utils.core.evaluation import zeroshot
from lab_utils.experiments import benchmarks

PROMPT = "Review: {text}\nSentiment:"  # the lab's prompt, written out: a change must be deliberate
ANSWERS = (" negative", " positive")  # label 0, label 1

REVIEWS = ["a good movie with a great plot", "the acting was bad and the story long",
           "this film is not good", "very good people and a new city", "a bad year for the state",
           "the most great scene of the week", "it was just like the plot said", "made to be bad"]


def test_task_yaml_loads_offline_with_the_labs_documents():
    loaded = zeroshot.task_manager(zeroshot.OFFLINE_TASKS, split_seed=0).load(["lab_sentiment"])
    task = loaded["tasks"]["lab_sentiment"]
    test = data.movie_reviews(seed=0)["test"]
    docs = task.eval_docs
    assert len(docs) == len(test) > 1000
    assert docs["id"] == test["id"] and docs["label"] == test["label"]
    doc = docs[3]
    assert task.doc_to_text(doc) == PROMPT.format(text=doc["text"])
    assert [task.config.target_delimiter + c for c in task.doc_to_choice(doc)] == list(ANSWERS)
    assert task.doc_to_target(doc) == doc["label"]
    # another split seed reaches the lab's loader through the task metadata
    other = zeroshot.task_manager(zeroshot.OFFLINE_TASKS, split_seed=1).load(["lab_sentiment"])
    assert other["tasks"]["lab_sentiment"].eval_docs["id"] != test["id"]


def test_subset_is_the_benchmarks_seeded_subset():
    test = data.movie_reviews(seed=0)["test"]
    idx = zeroshot.subset_indices(len(test), 128, seed=0)
    assert len(idx) == 128 and idx == sorted(idx)
    assert [test["id"][i] for i in idx] == benchmarks.subset(test, 128, seed=0)["id"]
    assert zeroshot.subset_indices(len(test), None) is None
    assert zeroshot.subset_indices(len(test), len(test) + 5) is None


def _byte_bpe(texts):
    """A byte-level BPE tokenizer trained on ``texts``: it keeps spaces and
    newlines in its tokens (as SmolLM2's and GPT-2's do), so a prompt that
    differs by one space or newline gives other token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def _tiny_decoder(vocab_size: int):
    import transformers as tf
    from tiny_models import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.vocab_size = vocab_size
    return tf.LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def _direct_logprobs(model, tok, texts) -> torch.Tensor:
    """log p(answer | prompt) per text and answer, one sequence at a time, no padding:
    the prompt's and the answer's token ids simply concatenated."""
    out = torch.zeros(len(texts), len(ANSWERS), dtype=torch.float64)
    for i, text in enumerate(texts):
        prompt = tok(PROMPT.format(text=text))["input_ids"]
        for k, answer in enumerate(ANSWERS):
            ans = tok(answer, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([prompt + ans])).logits[0].double(), -1)
            out[i, k] = sum(logp[len(prompt) - 1 + j, a] for j, a in enumerate(ans))
    return out


def test_lm_eval_choice_equals_a_direct_loglikelihood_computation(monkeypatch, capfd):
    tok = _byte_bpe([PROMPT.format(text=t) + a for t in REVIEWS for a in ANSWERS])
    model = _tiny_decoder(len(tok))
    direct = _direct_logprobs(model, tok, REVIEWS)
    pred = direct.argmax(1).tolist()
    # labels: the direct choice on the first six reviews, the other answer on the last two,
    # so the accuracy must come out at exactly 6/8; a prompt or answer that differs by a
    # token changes the log-likelihoods and, almost surely, some choices
    labels = [p if i < 6 else 1 - p for i, p in enumerate(pred)]
    split = datasets.Dataset.from_dict({"id": [str(i) for i in range(len(REVIEWS))],
                                        "text": REVIEWS, "label": labels})
    monkeypatch.setattr(data, "movie_reviews",
                        lambda seed=0: datasets.DatasetDict({"train": split, "test": split}))

    capfd.readouterr()
    results = zeroshot.run_harness(model, tok, n_examples=None, batch_size=3, log_samples=True)
    assert capfd.readouterr() == ("", "")  # lm-eval's logging, warnings and progress bars kept out
    samples = sorted(results["samples"]["lab_sentiment"], key=lambda s: s["doc_id"])
    harness = torch.tensor([[r[0][0] for r in s["resps"]] for s in samples], dtype=torch.float64)
    assert samples[0]["arguments"][1] == (PROMPT.format(text=REVIEWS[0]), ANSWERS[1])
    torch.testing.assert_close(harness, direct, atol=1e-4, rtol=0)

    rows = zeroshot.accuracy_rows(results, zeroshot.OFFLINE_TASKS)
    assert rows[0]["task"] == "lab_sentiment" and rows[0]["n"] == len(REVIEWS)
    assert rows[0]["accuracy"] == pytest.approx(6 / 8)
    assert 0 < rows[0]["stderr"] < 0.5
    assert rows[0]["harness_version"] == zeroshot.harness_version()

    # the public entry point on a seeded subset: n documents, the same rule as the benchmarks
    sub = zeroshot.zeroshot_accuracy(model, tok, n_examples=4, seed=0)[0]
    idx = zeroshot.subset_indices(len(REVIEWS), 4, seed=0)
    assert sub["n"] == 4
    assert sub["accuracy"] == pytest.approx(sum(pred[i] == labels[i] for i in idx) / 4)


def test_a_hub_task_without_the_hub_fails_in_one_line_before_any_work():
    with pytest.raises(ValueError) as err:
        zeroshot.check_tasks(["lab_sentiment", "boolq"], hub_available=False)
    assert "boolq" in str(err.value) and "\n" not in str(err.value)
    assert zeroshot.check_tasks(zeroshot.HUB_SUITE, hub_available=True) == zeroshot.HUB_SUITE
    # no model at all: a failure after the check would be a different error. The tests
    # run with HF_HUB_OFFLINE=1, so the hub counts as unavailable.
    with pytest.raises(ValueError, match="hellaswag.*need the Hugging Face hub"):
        zeroshot.zeroshot_accuracy(None, None, ("hellaswag",))
    with pytest.raises(ValueError, match="no zero-shot task named"):
        zeroshot.check_tasks([], hub_available=True)


def test_the_model_must_already_be_on_the_device():
    tok = _byte_bpe(REVIEWS)
    with pytest.raises(ValueError, match="the model is on cpu, not on cuda"):
        zeroshot.wrap_model(_tiny_decoder(len(tok)), tok, device="cuda")


def test_the_notebook_parameter_refuses_a_hub_task_without_the_hub(monkeypatch):
    from lab_utils.report import params

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub counts as unreachable, whatever the network
    params.validate({"zeroshot_tasks": ["lab_sentiment"]})
    with pytest.raises(params.ParamError) as err:
        params.validate({"notebooks": {"04_benchmarks": {"zeroshot_tasks": ["lab_sentiment", "boolq"]}}})
    assert str(err.value).startswith("zeroshot_tasks: ") and "boolq" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(params.ParamError, match="expected a list"):
        params.validate({"zeroshot_tasks": "lab_sentiment"})
    # the notebook's default and the benchmarks' config agree
    cfg = params.benchmark_config({"nsamples": 16, "seqlen": 256, "seed": 0, "size_formats": [],
                                   "zeroshot_tasks": ["lab_sentiment"]})
    assert cfg.bench.zeroshot_tasks == zeroshot.OFFLINE_TASKS
