"""Text corpora, calibration and evaluation windows, and synthesized speech.

The embedded data are the hand-scored sentences of Hutto & Gilbert (ICWSM
2014) in the ``vaderSentiment`` 3.3.2 sdist (MIT), fetched with ``pip
download`` (the only network this lab needs) and checked by sha256: 5,190 NYT
editorial sentences in reading order (perplexity text) and 10,605 movie-review
sentences scored in [-4, 4] (sentiment labels, calibration text). The hub
presets use WikiText-2, a C4 shard and GLUE SST-2 through ``datasets``.
"""

from __future__ import annotations

import io as _io
import random
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from lab_utils.core import files
from lab_utils.core.models import hub_reachable
from lab_utils.core.progress import tqdm
from lab_utils.core.speech import SAMPLE_RATE, synthesize

VADER_VERSION = "3.3.2"
VADER_SDIST = f"vaderSentiment-{VADER_VERSION}.tar.gz"
VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = f"vaderSentiment-{VADER_VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"
NYT_FILE = "nytEditorialSnippets_GroundTruth.txt"
MOVIE_FILE = "movieReviewSnippets_GroundTruth.txt"
CORPUS_FILES = (NYT_FILE, MOVIE_FILE, "amazonReviewSnippets_GroundTruth.txt",
                "tweets_GroundTruth.txt")
WINDOW_S = 29.0  # Whisper hears 30 s; keep a margin
GAP_S = 0.5  # silence between packed utterances
SPEAKABLE_WORDS = (6, 24)  # 24 words of espeak-ng speech stay well under Whisper's 30 s


class DataError(RuntimeError):
    pass


# --------------------------------------------------------------------------- fetching
def _download_sdist(dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--quiet", "-d", str(dest), f"vaderSentiment=={VADER_VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(f"could not download {VADER_SDIST} from PyPI (pip said: "
                        f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}). "
                        f"Check that PyPI is reachable, or place the file in {dest}")


def vader_archive() -> Path:
    """The verified sdist in the cache, downloaded (again) when missing or corrupt."""
    folder = files.cache_dir() / "data"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / VADER_SDIST
    if path.is_file() and files.sha256_file(path) == VADER_SHA256:
        return path
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        _download_sdist(Path(tmp))
        got = Path(tmp) / VADER_SDIST
        digest = files.sha256_file(got)
        if digest != VADER_SHA256:
            raise DataError(f"{VADER_SDIST}: sha256 {digest} does not match the pinned "
                            f"{VADER_SHA256}; refusing to use it")
        got.replace(path)
    return path


def corpus_dir() -> Path:
    """Folder holding the four ``*_GroundTruth.txt`` files, extracted and verified."""
    folder = files.cache_dir() / "data" / "hutto_ICWSM_2014"
    if files.verify_dir(folder) and files.sha256_file(vader_archive()) == VADER_SHA256:
        return folder
    archive = vader_archive()
    with files.atomic_dir(folder) as tmp, tarfile.open(archive) as outer:
        inner_bytes = outer.extractfile(INNER_ARCHIVE).read()
        with tarfile.open(fileobj=_io.BytesIO(inner_bytes)) as inner:
            for member in inner.getmembers():
                name = Path(member.name).name
                if name in CORPUS_FILES and member.isfile():
                    (tmp / name).write_bytes(inner.extractfile(member).read())
        missing = [f for f in CORPUS_FILES if not (tmp / f).is_file()]
        if missing:
            raise DataError(f"{archive} lacks {missing}")
    return folder


def read_ground_truth(path: str | Path) -> list[tuple[str, float, str]]:
    """Rows of ``id<TAB>score<TAB>text`` (CRLF endings tolerated)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        ident, score, text = line.split("\t", 2)
        rows.append((ident.strip(), float(score), text.strip()))
    return rows


# --------------------------------------------------------------------------- corpora
@lru_cache(maxsize=1)
def nyt_sentences() -> tuple[tuple[str, str], ...]:
    """(article_id, sentence) in reading order."""
    rows = read_ground_truth(corpus_dir() / NYT_FILE)
    return tuple((ident.split("_")[0], text) for ident, _, text in rows)


def nyt_articles():
    """``datasets.Dataset`` of NYT editorials: article id and its sentences joined by a space."""
    import datasets

    order: list[str] = []
    parts: dict[str, list[str]] = {}
    for art, sent in nyt_sentences():
        if art not in parts:
            order.append(art)
            parts[art] = []
        parts[art].append(sent)
    return datasets.Dataset.from_dict({"article_id": order,
                                       "text": [" ".join(parts[a]) for a in order]})


def nyt_text() -> str:
    """The perplexity evaluation text: articles in file order joined by a blank line."""
    return "\n\n".join(nyt_articles()["text"])


@lru_cache(maxsize=1)
def _movie_rows() -> tuple[tuple[str, float, str], ...]:
    return tuple(read_ground_truth(corpus_dir() / MOVIE_FILE))


def movie_review_text() -> str:
    """Calibration text: every movie-review sentence in file order, joined by a space."""
    return " ".join(text for _, _, text in _movie_rows())


def movie_reviews(test_fraction: float = 0.2, seed: int = 0):
    """``DatasetDict`` with train/test splits of scored movie-review sentences.

    Label 1 if the mean human score is > 0, 0 if < 0; the sentences scored
    exactly 0 are dropped. The split is a seeded permutation, so it is the same
    on every machine.
    """
    import datasets

    rows = [r for r in _movie_rows() if r[1] != 0.0]
    perm = np.random.default_rng(seed).permutation(len(rows))
    n_test = int(round(test_fraction * len(rows)))
    splits = {"test": sorted(perm[:n_test].tolist()), "train": sorted(perm[n_test:].tolist())}

    def build(idx):
        sel = [rows[i] for i in idx]
        return datasets.Dataset.from_dict({
            "id": [r[0] for r in sel], "text": [r[2] for r in sel],
            "score": [r[1] for r in sel], "label": [int(r[1] > 0) for r in sel]})

    return datasets.DatasetDict({k: build(v) for k, v in splits.items()})


def _speakable(sentence: str) -> bool:
    low, high = SPEAKABLE_WORDS
    return low <= len(sentence.split()) <= high


def speech_sentences(n: int) -> list[str]:
    """The first ``n`` NYT sentences of a speakable length, in reading order."""
    return [sent for _, sent in nyt_sentences() if _speakable(sent)][:n]


# --------------------------------------------------------------------------- hub corpora
def _require_hub(what: str) -> None:
    ok, reason = hub_reachable()
    if not ok:
        raise DataError(f"{what} comes from the Hugging Face hub, which is not reachable here "
                        f"({reason}). The embedded corpora (NYT editorials, movie reviews) need no hub.")


def wikitext2_text() -> str:
    """WikiText-2 raw test split joined by blank lines (the Wanda/SparseGPT eval text)."""
    import datasets

    _require_hub("WikiText-2")
    test = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    return "\n\n".join(test["text"])


def c4_calibration_text() -> list[str]:
    """The first 20,000 documents of the first C4 training shard (the papers' calibration data)."""
    import datasets

    _require_hub("C4")
    ds = datasets.load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                               split="train")
    return ds.select(range(min(20000, len(ds))))["text"]


def sst2():
    """GLUE SST-2 (train, validation) as a DatasetDict with text/label columns."""
    import datasets

    _require_hub("GLUE SST-2")
    ds = datasets.load_dataset("glue", "sst2")
    return ds.rename_column("sentence", "text")


# --------------------------------------------------------------------------- token windows
EVAL_TEXTS = {"nyt": nyt_text, "wikitext2": wikitext2_text}
CALIBRATION_CORPORA = ("movie-reviews", "c4")


def eval_text(corpus: str = "nyt") -> str:
    if corpus not in EVAL_TEXTS:
        raise DataError(f"unknown evaluation corpus {corpus!r}; choose one of {tuple(EVAL_TEXTS)}")
    return EVAL_TEXTS[corpus]()


def _token_ids(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(tokenizer, seqlen: int, n_windows: int | None = None,
                 corpus: str = "nyt") -> torch.Tensor:
    """The first ``n_windows`` non-overlapping windows of ``seqlen`` tokens
    (all of them when None), as a LongTensor of shape (K, seqlen)."""
    if seqlen <= 0:
        raise ValueError(f"seqlen must be positive, got {seqlen}")
    ids = _token_ids(tokenizer, eval_text(corpus))
    total = ids.numel() // seqlen
    k = total if n_windows is None else min(n_windows, total)
    if k == 0:
        raise DataError(f"{corpus} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: k * seqlen].view(k, seqlen)


def forward_inputs(lm, tokens: int = 512) -> dict:
    """One batch of real text for a whole-model forward: ``tokens`` tokens of
    the NYT editorials (decoder and encoder models; capped at the encoder's
    positions), or 30 s of log-mel frames plus ``tokens`` decoder tokens for
    Whisper (a zero input: its timing does not depend on the values)."""
    config = lm.model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "max_target_positions", None)
    n = min(tokens, limit) if limit else tokens
    ids = token_windows(lm.tokenizer, "eval", 1, n)  # tokenized once per process
    if config.model_type == "whisper":
        n = min(tokens, config.max_target_positions)
        frames = 2 * config.max_source_positions
        return {"input_features": torch.zeros(1, config.num_mel_bins, frames), "decoder_input_ids": ids[:, :n]}
    if getattr(config, "is_encoder_decoder", False):
        return {"input_ids": ids, "decoder_input_ids": ids}
    return {"input_ids": ids} | ({"use_cache": False} if "Causal" in type(lm.model).__name__ else {})


def calibration_windows(tokenizer, nsamples: int, seqlen: int, seed: int = 0,
                        corpus: str = "movie-reviews") -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, drawn as the Wanda and
    SparseGPT reference code draws them: ``random.seed(seed)`` then one
    ``random.randint(0, n_tokens - seqlen - 1)`` start per sample."""
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"nsamples and seqlen must be positive, got {nsamples}, {seqlen}")
    if corpus == "movie-reviews":
        ids = _token_ids(tokenizer, movie_review_text())
        n = ids.numel()
        if n <= seqlen + 1:
            raise DataError(f"calibration text has {n} tokens, too few for seqlen {seqlen}")
        random.seed(seed)
        starts = [random.randint(0, n - seqlen - 1) for _ in range(nsamples)]
        return torch.stack([ids[s : s + seqlen] for s in starts])
    if corpus == "c4":
        # As in the papers: a random document long enough, then a random window in it.
        docs = c4_calibration_text()
        random.seed(seed)
        out = []
        while len(out) < nsamples:
            doc = _token_ids(tokenizer, docs[random.randint(0, len(docs) - 1)])
            if doc.numel() > seqlen:
                s = random.randint(0, doc.numel() - seqlen - 1)
                out.append(doc[s : s + seqlen])
        return torch.stack(out)
    raise DataError(f"unknown calibration corpus {corpus!r}; choose one of {CALIBRATION_CORPORA}")


_WINDOWS: dict = {}  # token windows by (tokenizer, kind, n, seqlen, seed, corpus); a few at most
_WINDOWS_KEPT = 32


def token_windows(tokenizer, kind: str, n: int | None, seqlen: int, seed: int = 0,
                  corpus: str | None = None) -> torch.Tensor:
    """:func:`eval_windows` (``kind="eval"``, ``n`` windows, the seed unused) or
    :func:`calibration_windows` (``kind="calibration"``, ``n`` samples),
    remembered per tokenizer (its class, folder and size): tokenizing a whole
    corpus takes seconds, and a sweep asks for the same windows again and
    again. Callers share the tensor: read it, never write into it."""
    if kind not in ("eval", "calibration"):
        raise ValueError(f"kind must be 'eval' or 'calibration', got {kind!r}")
    corpus = corpus or ("nyt" if kind == "eval" else "movie-reviews")
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
           kind, n, seqlen, seed if kind == "calibration" else None, corpus)
    if key not in _WINDOWS:
        if len(_WINDOWS) >= _WINDOWS_KEPT:
            _WINDOWS.pop(next(iter(_WINDOWS)))
        _WINDOWS[key] = (eval_windows(tokenizer, seqlen, n, corpus) if kind == "eval"
                         else calibration_windows(tokenizer, n, seqlen, seed, corpus))
    return _WINDOWS[key]


def calibration_sentences(nsamples: int, seed: int = 0) -> list[str]:
    """Sentences for encoder-decoder calibration (speech for Whisper), drawn
    from the movie reviews, so they never overlap the NYT evaluation text."""
    pool = [t for _, _, t in _movie_rows() if _speakable(t)]
    rng = random.Random(seed)
    return rng.sample(pool, min(nsamples, len(pool)))


# --------------------------------------------------------------------------- speech
def speech(texts: list[str], voice: str = "en-us") -> list[np.ndarray]:
    """16 kHz float32 speech for each text, synthesized once and cached on disk."""
    folder = files.cache_dir() / "speech" / voice
    out = []
    for text in tqdm(texts, desc="speech", leave=False):
        path = folder / f"{files.sha256_bytes(text.encode())[:24]}.npy"
        data = files.read_checked(path)
        if data is not None:
            out.append(np.load(_io.BytesIO(data)))
            continue
        audio = synthesize(text, voice)
        buf = _io.BytesIO()
        np.save(buf, audio)
        files.write_checked(path, buf.getvalue())
        out.append(audio)
    return out


def pack(texts: list[str], audio: list[np.ndarray], per_window: int) -> tuple[list[str], list[np.ndarray]]:
    """Consecutive utterances joined into clips of at most ``per_window``
    utterances and :data:`WINDOW_S` seconds, :data:`GAP_S` of silence between
    them; their texts joined by a space. ``per_window=1`` leaves them as they are."""
    if per_window <= 1:
        return list(texts), list(audio)
    gap = np.zeros(int(GAP_S * SAMPLE_RATE), dtype=np.float32)
    limit = int(WINDOW_S * SAMPLE_RATE)
    clips: list[tuple[list[str], list[np.ndarray]]] = []
    for t, a in zip(texts, audio, strict=True):
        cur_t, cur_a = clips[-1] if clips else ([], [])
        size = sum(len(x) for x in cur_a) + len(gap) * len(cur_a) + len(a)
        if not clips or len(cur_a) >= per_window or size > limit:
            clips.append(([], []))
        clips[-1][0].append(t)
        clips[-1][1].append(a)
    return ([" ".join(ts) for ts, _ in clips],
            [np.concatenate([p for x in a_s for p in (x, gap)][:-1]) for _, a_s in clips])
