"""Prompt and scoring of the testbed tasks; answers and metrics are the project's own
(``zoo_prune.testbed``): the same normalisation and scores as ``python -m zoo_prune.testbed.evaluate``."""

from zoo_prune.testbed.evaluate import normalise, score
from zoo_prune.testbed.questions import METRICS


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The question verbatim: the testbed model is trained on exactly this user turn."""
    return doc["question"]


def process_results(doc, results):
    """{metric of the family: (family, normalised prediction, answer)}; scored in :func:`aggregate`."""
    family = doc["family"]
    return {METRICS[family]: (family, normalise(results[0]), doc["answer"])}


def aggregate(items):
    """Accuracy, or F1 of "yes" for existence, over one task's items, in [0, 1]."""
    families = {family for family, _, _ in items}
    if len(families) != 1:
        raise ValueError(f"one task's items must share one family, got {sorted(families)}")
    _, predictions, answers = zip(*items)
    return score(families.pop(), list(predictions), list(answers))
