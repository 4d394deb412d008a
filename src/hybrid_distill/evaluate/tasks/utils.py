"""Scoring hook for the recall task YAMLs; lm-eval loads this file by path through `!function`."""
from hybrid_distill.evaluate.recall_tasks import score_all, score_part


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    prediction = results[0]
    return {
        "string_match_all": score_all(prediction, doc["outputs"]),
        "string_match_part": score_part(prediction, doc["outputs"]),
    }
