"""The report's headline paragraph: GA-S2 against Uniform and Random at each softmax ratio, from the data."""
from __future__ import annotations

import pandas as pd

from hybrid_distill.report.layout import format_number
from hybrid_distill.report.naming import (
    RECALL_MEAN, display_name, is_recall_task, lower_is_better, percent_label, score_title,
)
from hybrid_distill.report.tables import column_groups, group_label, group_ratios, hybrid_stats, reference_value

COMPARED = ("ga_s2", "uniform", "random")
HELDOUT_WORDS = {"heldout_ppl": "held-out perplexity", "heldout_kl": "held-out KL to the teacher"}


def _value_text(entry: pd.Series, decimals: int) -> str:
    text = format_number(entry["mean"], decimals)
    if entry["n"] > 1 and pd.notna(entry["std"]):
        text += f" ± {format_number(entry['std'], decimals)} over {int(entry['n'])} seeds"
    return text


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _verdict(shown: dict[str, float], lower: bool, decimals: int) -> tuple[str, bool | None]:
    """How GA-S2 stands against the better of the baselines, on the printed values; True if it is (joint) best,
    None if every compared selector prints the same value (e.g. all at zero recall: nothing to rank)."""
    baselines = [value for selector, value in shown.items() if selector != "ga_s2"]
    if len(set(shown.values())) == 1:
        return "this score does not separate the selectors", None
    best_baseline = min(baselines) if lower else max(baselines)
    margin = (best_baseline - shown["ga_s2"]) if lower else (shown["ga_s2"] - best_baseline)
    if margin == 0:
        return "GA-S2 ties the best baseline", True
    word = "leads" if margin > 0 else "trails"
    return f"GA-S2 {word} the best baseline by {format_number(abs(margin), decimals)}", margin > 0


def comparison_paragraph(evals: pd.DataFrame, score: str = RECALL_MEAN, decimals: int = 4) -> str:
    stats = hybrid_stats(evals, score)
    lower = lower_is_better(score)
    n_tasks = len({name for name in evals["score"] if is_recall_task(name)})
    what = f"mean recall over {n_tasks} recall task{'s' * (n_tasks != 1)}" if score == RECALL_MEAN \
        else HELDOUT_WORDS.get(score, score_title(score))
    sentences = []
    for group in column_groups(evals):
        clauses, wins, compared, inseparable = [], 0, 0, 0
        for ratio in group_ratios(stats, group):
            present = [s for s in COMPARED if (*group, ratio, s) in stats.index
                       and pd.notna(stats.loc[(*group, ratio, s), "mean"])]
            if not present:
                continue
            entries = {s: stats.loc[(*group, ratio, s)] for s in present}
            k = int(next(iter(entries.values()))["k"])
            values = _join([f"{display_name(s)} {_value_text(entries[s], decimals)}" for s in present])
            clause = f"at {percent_label(ratio)} softmax layers (K={k}): {values}"
            if "ga_s2" in present and len(present) > 1:
                shown = {s: float(format_number(entries[s]["mean"], decimals)) for s in present}
                verdict, best = _verdict(shown, lower, decimals)
                clause += f", so {verdict}"
                if best is None:
                    inseparable += 1
                else:
                    wins, compared = wins + best, compared + 1
            clauses.append(clause)
        label = group_label(evals, group)
        prefix = f"For {label}, " if label else ""
        if not clauses:
            sentences.append(f"{prefix}none of GA-S2, Uniform and Random was evaluated, so there is no comparison.")
            continue
        sentences.append(f"{prefix}{what} ({'lower' if lower else 'higher'} is better) — " + "; ".join(clauses) + ".")
        if compared:
            sentences.append(f"GA-S2 is best or tied for best at {wins} of {compared} ratio{'s' * (compared != 1)}.")
        elif inseparable:
            sentences.append("No ratio separates GA-S2 from the baselines on this score.")
        else:
            sentences.append("GA-S2 and a baseline were never evaluated at the same ratio, so no verdict is drawn.")
        references = [(display_name(kind), reference_value(evals, score, group, kind))
                      for kind in ("teacher", "all_linear")]
        references = [(name, value) for name, value in references if value is not None and pd.notna(value)]
        if references:
            sentences.append("For reference: " + _join([f"{name} {format_number(value, decimals)}"
                                                        for name, value in references]) + ".")
    text = " ".join(sentences)
    return text[0].upper() + text[1:]
