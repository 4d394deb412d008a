"""What the report calls things: selector display names and groups, score direction, column labels."""
from __future__ import annotations

import re

REFERENCE_KINDS = ("teacher", "all_linear")
KINDS = ("hybrid", *REFERENCE_KINDS)
REFERENCE_GROUP = "Reference"
OTHER_GROUP = "Other"
RECALL_MEAN = "recall_mean"

# Group order is the table's row order; within a group, the listed order.
SELECTOR_GROUPS: dict[str, tuple[str, ...]] = {
    "Heuristic": ("uniform", "random", "act_mse", "lm_ppl", "ar", "kv", "user"),
    "Learning-based": ("ga_s1", "gr_s1", "avg_s1", "ga_s2", "gr_s2", "avg_s2", "ga_iter"),
}
DISPLAY_NAMES = {
    "teacher": "Teacher", "all_linear": "All-linear",
    "uniform": "Uniform", "random": "Random", "act_mse": "ACT-MSE", "lm_ppl": "LM-PPL", "ar": "AR",
    "kv": "KV", "user": "User", "ga_s1": "GA-S1", "gr_s1": "GR-S1", "avg_s1": "AVG-S1", "ga_s2": "GA-S2",
    "gr_s2": "GR-S2", "avg_s2": "AVG-S2", "ga_iter": "GA-iter",
}
KNOWN_SELECTORS = tuple(name for names in SELECTOR_GROUPS.values() for name in names)


def display_name(selector: str) -> str:
    """Paper spelling for known selectors and reference kinds; anything else is shown as written."""
    return DISPLAY_NAMES.get(selector, selector)


def selector_group(selector: str) -> str:
    if selector in REFERENCE_KINDS:
        return REFERENCE_GROUP
    for group, names in SELECTOR_GROUPS.items():
        if selector in names:
            return group
    return OTHER_GROUP


def group_order() -> tuple[str, ...]:
    return (REFERENCE_GROUP, *SELECTOR_GROUPS, OTHER_GROUP)


def selector_sort_key(selector: str) -> tuple[int, int, str]:
    """Reference rows, then heuristic, learning-based and unknown selectors (alphabetical), in table order."""
    group = selector_group(selector)
    names = REFERENCE_KINDS if group == REFERENCE_GROUP else SELECTOR_GROUPS.get(group, ())
    position = names.index(selector) if selector in names else len(names)
    return group_order().index(group), position, selector


def lower_is_better(score: str) -> bool:
    """Held-out perplexity and KL fall as the model improves; every other score rises."""
    return score.startswith("heldout_")


def is_recall_task(score: str) -> bool:
    return not lower_is_better(score) and score != RECALL_MEAN


def score_title(score: str) -> str:
    return "Recall (mean over recall tasks)" if score == RECALL_MEAN else score


def percent_label(ratio: float) -> str:
    """0.125 -> '12.5%', 0.25 -> '25%', 1/3 -> '33.3%': one decimal, a trailing '.0' dropped."""
    return f"{100 * ratio:.1f}".removesuffix(".0") + "%"


def file_slug(name: str) -> str:
    """A score name as a file name: 'niah_single@512' -> 'niah_single_512'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "score"


def seed_from_model(model: str, selector: str) -> int | None:
    """'random_s1_K4' or 'random_seed1_K4' with selector 'random' -> 1; 'ga_s2_K4' with selector 'ga_s2' -> None."""
    if not model.startswith(selector):
        return None
    match = re.fullmatch(r"_s(?:eed)?(\d+)_K\d+", model[len(selector):])
    return int(match.group(1)) if match else None


MIXER_NAMES = {"gdn": "GDN", "gla": "GLA"}


def mixer_name(mixer: str) -> str:
    return MIXER_NAMES.get(mixer, mixer)


def selector_of_model(model: str) -> str | None:
    """The known selector a hybrid's model name starts with ('ga_s2_K4' -> 'ga_s2'), longest match first."""
    return max((name for name in KNOWN_SELECTORS if model.startswith(name + "_")), key=len, default=None)


def model_label(model: str, kind: str, k: int | None, selector: str | None = None) -> str:
    """'Teacher', 'All-linear', 'GA-S2 K=4', 'Random K=4 (seed 1)'; unknown hybrids keep their model name."""
    if kind in REFERENCE_KINDS:
        return display_name(kind)
    selector = selector or selector_of_model(model)
    if selector is None:
        return model if k is None or f"K{k}" in model else f"{model} K={k}"
    seed = seed_from_model(model, selector)
    label = display_name(selector) + ("" if k is None else f" K={k}")
    return label + ("" if seed is None else f" (seed {seed})")
