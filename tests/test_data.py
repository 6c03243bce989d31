import shutil

import numpy as np
import pytest
from tiny_models import tiny_tokenizer

from lab_utils.core import data, files


def test_corpora_shapes():
    sents = data.nyt_sentences()
    assert len(sents) == 5190  # OFFLINE.md: 5,190 NYT sentences
    arts = data.nyt_articles()
    assert len(arts) == len({a for a, _ in sents})
    text = data.nyt_text()
    assert text.count("\n\n") == len(arts) - 1
    assert "\r" not in text


def test_movie_review_split_is_deterministic_and_disjoint():
    a = data.movie_reviews(seed=0)
    b = data.movie_reviews(seed=0)
    c = data.movie_reviews(seed=1)
    assert a["test"]["id"] == b["test"]["id"]
    assert a["test"]["id"] != c["test"]["id"]
    assert not set(a["test"]["id"]) & set(a["train"]["id"])
    assert len(a["test"]) + len(a["train"]) == 10605 - 37  # the 37 zero-score sentences are dropped
    labels = np.array(a["train"]["label"])
    scores = np.array(a["train"]["score"])
    assert ((scores > 0) == (labels == 1)).all()


def test_windows_follow_the_protocol():
    tok = tiny_tokenizer()
    ev = data.eval_windows(tok, seqlen=16, n_windows=3)
    assert ev.shape == (3, 16)
    ids = tok(data.nyt_text(), add_special_tokens=False)["input_ids"]
    assert ev.flatten().tolist() == ids[:48]  # non-overlapping, from the start
    c1 = data.calibration_windows(tok, nsamples=4, seqlen=16, seed=0)
    c2 = data.calibration_windows(tok, nsamples=4, seqlen=16, seed=0)
    c3 = data.calibration_windows(tok, nsamples=4, seqlen=16, seed=1)
    assert c1.shape == (4, 16) and (c1 == c2).all() and not (c1 == c3).all()


def test_bad_window_arguments():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError):
        data.calibration_windows(tok, nsamples=0, seqlen=16)
    with pytest.raises(data.DataError, match="unknown"):
        data.eval_windows(tok, seqlen=16, corpus="nope")


def test_hub_corpora_fail_clearly_without_hub():
    from lab_utils.core import models

    models.hub_reachable.cache_clear()
    with pytest.raises(data.DataError, match="hub"):
        data.wikitext2_text()


@pytest.mark.slow
def test_corrupted_cached_archive_is_detected_and_fetched_again(tmp_path, monkeypatch):
    # an empty cache holding a copy of the real cache's verified archive: the corrupted copy is
    # fetched again (one download: a first fetch into an empty cache is the same call)
    real = data.vader_archive()
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    (files.cache_dir() / "data").mkdir()
    shutil.copyfile(real, files.cache_dir() / "data" / data.VADER_SDIST)
    data.nyt_sentences.cache_clear()
    try:
        folder = data.corpus_dir()
        archive = files.cache_dir() / "data" / data.VADER_SDIST
        assert files.sha256_file(archive) == data.VADER_SHA256
        # truncate the archive and edit an extracted file
        archive.write_bytes(archive.read_bytes()[:1000])
        (folder / data.NYT_FILE).write_text("1_1\t0.0\ttampered\n")
        assert not files.verify_dir(folder)
        folder2 = data.corpus_dir()
        assert files.sha256_file(archive) == data.VADER_SHA256
        data.nyt_sentences.cache_clear()
        assert len(data.nyt_sentences()) == 5190
        assert folder2 == folder
    finally:
        data.nyt_sentences.cache_clear()


@pytest.mark.slow
def test_speech_is_cached_and_16khz(tmp_cache):
    a = data.speech(["The market opened early."])
    b = data.speech(["The market opened early."])
    assert a[0].dtype == np.float32 and np.array_equal(a[0], b[0])
    seconds = len(a[0]) / 16000
    assert 0.5 < seconds < 5
