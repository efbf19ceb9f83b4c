"""Accuracy as an ``evaluate`` metric module, shipped so that evaluation works offline.

``evaluate.load("accuracy")`` fetches its script from the Hugging Face Hub; this module has the
same inputs and output (``predictions``, ``references``, optional ``normalize`` and
``sample_weight``; returns ``{"accuracy": float}``) and is loaded by
:func:`metrics.load_metric` (``recipes/metrics``) when the Hub is not reachable.

.. math::  \\text{accuracy} = \\frac{\\sum_i w_i\\,[\\hat y_i = y_i]}{\\sum_i w_i}

(``w_i = 1`` without ``sample_weight``; with ``normalize=False`` the weighted count of correct
predictions is returned instead of the fraction).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Fraction (or weighted count) of predictions equal to their reference label."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    normalize (bool): return the fraction correct (default) or the number correct.
    sample_weight (list of float): per-example weights (default: all 1).
Returns:
    accuracy (float): in [0, 1] with normalize=True, else the (weighted) count.
Example:
    >>> metric = load_metric("accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, float)
        if weights.shape != correct.shape:
            raise ValueError(f"sample_weight has {weights.shape[0]} entries for {correct.shape[0]} "
                             "predictions; give one weight per prediction")
        total = float(np.sum(weights * correct))
        return {"accuracy": total / float(np.sum(weights)) if normalize else total}
