"""F1: the harmonic mean of precision and recall (scikit-learn's ``f1_score``).

For binary labels it is the F1 of the positive class (``pos_label=1``);
``average="macro"`` averages the classes.
"""

import datasets
import evaluate
from sklearn.metrics import f1_score

_DESCRIPTION = "F1 = 2 * precision * recall / (precision + recall)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    labels (list of int): the labels to include when average != 'binary'.
    pos_label (int): the positive class for average='binary' (default 1).
    average (str): 'binary' (default), 'micro', 'macro', 'weighted' or None (one score per class).
    sample_weight (list of float): optional weight of each example.
Returns:
    f1 (float, or a list of floats when average=None): in [0, 1].
Example:
    >>> load_metric("f1").compute(predictions=[1, 1, 0, 0], references=[1, 0, 1, 0])
    {'f1': 0.5}
"""

_CITATION = "Pedregosa et al., Scikit-learn: Machine Learning in Python, JMLR 12, 2011."


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"),
                                        "references": datasets.Value("int32")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary",
                 sample_weight=None):
        # zero_division=0: a model that never predicts the positive class scores
        # F1 = 0 (the honest value for a collapsed classifier), without a warning.
        score = f1_score(references, predictions, labels=labels, pos_label=pos_label,
                         average=average, sample_weight=sample_weight, zero_division=0)
        return {"f1": score.tolist() if average is None else float(score)}
