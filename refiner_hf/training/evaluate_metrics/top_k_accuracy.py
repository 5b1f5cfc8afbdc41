"""Top-1 and top-5 accuracy as an `evaluate` metric module, loaded by path so that no Hub access is needed."""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Top-k accuracy of a classifier: the fraction of samples whose reference label is among the first k of the predicted
labels. `predictions` are each sample's labels ranked by score (at least as many as the largest k), `references`
the true labels.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): each sample's predicted labels, best first.
    references (`list` of `int`): the true labels.
    top_k (`list` of `int`, defaults to `[1, 5]`): the k values to report; k larger than the number of ranked labels
        counts every sample whose label is among them.
Returns:
    `top{k}` for each k (fractions in [0, 1]) and `num_samples`.
Examples:
    >>> metric = evaluate.load("refiner_hf/training/evaluate_metrics/top_k_accuracy.py")
    >>> metric.compute(predictions=[[2, 0, 1], [1, 2, 0]], references=[2, 0], top_k=[1, 3])
    {'top1': 0.5, 'top3': 1.0, 'num_samples': 2}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, top_k=(1, 5)):
        ranked = np.asarray(predictions, dtype=np.int64).reshape(len(references), -1)
        hits = ranked == np.asarray(references, dtype=np.int64)[:, None]
        results = {f"top{k}": float(hits[:, :k].any(axis=1).mean()) if len(references) else 0.0 for k in top_k}
        results["num_samples"] = len(references)
        return results
