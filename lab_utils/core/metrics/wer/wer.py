"""Word error rate by jiwer, pooled over the whole corpus (it can exceed 1).

The text is compared as given: normalize predictions and references first
(:func:`lab_utils.core.evaluation.asr.normalize` does it for Whisper).
"""

import datasets
import evaluate
import jiwer

_DESCRIPTION = "Word error rate = (S + D + I) / N over the whole corpus, from jiwer's alignment."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): transcriptions to score.
    references (list of str): the reference transcriptions (none may be empty).
Returns:
    wer (float): in [0, inf).
    substitutions, deletions, insertions, hits (int): the alignment's counts.
    reference_words (int): N, the number of reference words.
Example:
    >>> load_metric("wer").compute(predictions=["the cat sat"], references=["the cat sat down"])
    {'wer': 0.25, 'substitutions': 0, 'deletions': 1, 'insertions': 0, 'hits': 3, 'reference_words': 4}
"""

_CITATION = "jiwer: https://github.com/jitsi/jiwer (Apache-2.0)."


class WER(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            codebase_urls=["https://github.com/jitsi/jiwer"],
        )

    def _compute(self, predictions, references):
        if any(not r.strip() for r in references):
            raise ValueError("wer: every reference must contain at least one word (an empty "
                             "reference has no error rate); drop those pairs first")
        out = jiwer.process_words(list(references), list(predictions))
        n = out.hits + out.substitutions + out.deletions
        return {"wer": float(out.wer), "substitutions": int(out.substitutions),
                "deletions": int(out.deletions), "insertions": int(out.insertions),
                "hits": int(out.hits), "reference_words": int(n)}
