"""Build the whole report: load and check every input first, then write tables, figures and report.md."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from hybrid_distill.report import figures
from hybrid_distill.report.collect import (
    load_early_stop, load_efficiency, load_evaluations, load_importance, load_selections,
)
from hybrid_distill.report.csv_table import to_csv
from hybrid_distill.report.efficiency_table import efficiency_table
from hybrid_distill.report.files import write_text_atomic
from hybrid_distill.report.latex import to_latex
from hybrid_distill.report.layout import Table
from hybrid_distill.report.markdown import escape, to_markdown
from hybrid_distill.report.naming import RECALL_MEAN, file_slug, lower_is_better
from hybrid_distill.report.summary import comparison_paragraph
from hybrid_distill.report.tables import layers_table, score_names, score_table, summary_table, with_recall_mean
from hybrid_distill.select.early_stop import jaccard

log = logging.getLogger(__name__)

CONVENTIONS = (
    "Bold marks the best hybrid in each column (highest score; lowest for `heldout_*`), judged on the printed "
    "values so that visible ties are all bold; Teacher and All-linear rows are references and never bold.",
    "Selectors run more than once (e.g. random seeds) show mean ± sample standard deviation (n − 1) "
    "over the runs, and the run count in the row label.",
    "Scores have {decimals} decimals; a dash marks a combination that was not evaluated. "
    "CSV files hold the unrounded numbers and no markup.",
    "Columns are the softmax ratio from the evaluation files (K / L where the ratio was not given).",
)


class _Report:
    """Collects report.md's lines and writes tables and figures under the output directory."""

    def __init__(self, out_dir: Path, report_path: Path):
        self.report_dir = report_path.parent
        self.tables_dir = out_dir / "tables"
        self.figures_dir = out_dir / "figures"
        for directory in (self.tables_dir, self.figures_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []

    def _relative(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.report_dir)).as_posix()

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, table: Table, stem: str) -> None:
        """Write the CSV, LaTeX and Markdown versions, link all three and show the Markdown inline."""
        rendered = {"csv": to_csv(table), "tex": to_latex(table), "md": to_markdown(table)}
        links = []
        for (suffix, text), name in zip(rendered.items(), ("CSV", "LaTeX", "Markdown")):
            path = write_text_atomic(self.tables_dir / f"{stem}.{suffix}", text)
            links.append(f"[{name}]({self._relative(path)})")
        self.add(f"Table files: {' · '.join(links)}", "", rendered["md"].rstrip("\n"), "")

    def figure(self, paths: list[Path], caption: str) -> None:
        png, pdf = paths
        self.add(f"![{escape(caption)}]({self._relative(png)})", "", f"PDF: [{pdf.name}]({self._relative(pdf)})", "")

    def note(self, text: str) -> None:
        log.info("report: %s", text)
        self.add(f"> Note: {text}", "")


def _headline(evals: pd.DataFrame, decimals: int) -> list[str]:
    """GA-S2 vs the baselines on recall, then on each held-out score: recall alone can fail to separate them."""
    scores = [RECALL_MEAN] + [name for name in score_names(evals) if name.startswith("heldout_")]
    lines = []
    for score in scores:
        lines += [comparison_paragraph(evals, score=score, decimals=decimals), ""]
    return lines


def _direction(score: str) -> str:
    return "lower is better" if lower_is_better(score) else "higher is better"


def _score_sections(report: _Report, evals: pd.DataFrame, decimals: int) -> None:
    names = score_names(evals)
    if RECALL_MEAN in names:
        report.add("## Recall: selector × softmax ratio", "",
                   "Mean over the recall tasks per model (the paper's Table 4 layout).", "")
        report.table(score_table(evals, RECALL_MEAN, decimals), "score_recall_mean")
        stem = report.figures_dir / "recall_mean_vs_ratio"
        report.figure(figures.plot_score_vs_ratio(evals, RECALL_MEAN, stem), "Mean recall against softmax ratio")
    else:
        report.note("no recall task among the scores: the recall table and figure are skipped.")
    report.add("## Per-score tables", "")
    for name in names:
        if name != RECALL_MEAN:
            report.add(f"### {escape(name)} ({_direction(name)})", "")
            report.table(score_table(evals, name, decimals), f"score_{file_slug(name)}")
    report.add("## Summary per model", "", "Recall mean and held-out scores, one block per softmax ratio.", "")
    report.table(summary_table(evals, decimals), "summary")
    report.add("## Chosen softmax layers", "", "Layer indices from 0 (first decoder layer).", "")
    report.table(layers_table(evals), "softmax_layers")


def _ga_s2_sets(evals: pd.DataFrame, selections: pd.DataFrame) -> dict[int, tuple[int, ...]]:
    """GA-S2's layer set per K: from the selection files, else from the evaluated GA-S2 hybrids."""
    chosen = selections[selections["selector"] == "ga_s2"]
    if not chosen.empty:
        return dict(zip(chosen["k"].astype(int), chosen["softmax_layers"]))
    models = evals[(evals["selector"] == "ga_s2") & (evals["kind"] == "hybrid")].drop_duplicates("source")
    return dict(zip(models["k"].astype(int), models["softmax_layers"]))


def _importance_section(report: _Report, importance, ga_s2_sets: dict[int, tuple[int, ...]]) -> None:
    report.add("## Layer importance", "")
    if importance is None:
        report.note("no importance.csv given: the layer-importance section is skipped.")
        return
    ranked = importance.sort_values("rank")["layer"].tolist()
    report.add(f"Layers from most to least important: {', '.join(map(str, ranked))}.", "")
    if not ga_s2_sets:
        report.figure(figures.plot_importance(importance, [], None, report.figures_dir / "importance"),
                      "Per-layer importance")
    for k, layers in sorted(ga_s2_sets.items()):
        stem = report.figures_dir / f"importance_K{k}"
        report.figure(figures.plot_importance(importance, layers, k, stem), f"Per-layer importance, GA-S2 at K={k}")


def _racing_text(early_stop) -> str:
    racing = early_stop.get("racing") or {}
    if not racing.get("keep"):
        return ""
    return (f"; racing kept the {racing['keep']} best-ranked layers training once each had trained "
            f"{racing['from_tokens']:,} tokens")


def _job_end_text(early_stop) -> str:
    """A live job scores several rounds (scoring.snapshots_per_job): the run stops where the firing one ended."""
    stopped, rounds = early_stop.get("stopped_at_round"), early_stop["rounds"]
    if stopped is None or stopped == early_stop["fired_round"]:
        return ""
    step = rounds.loc[rounds["round"] == stopped, "step"]
    return (f" and scoring stopped where that job ended, round {stopped}"
            + (f" (step {step.iloc[0]})" if not step.empty else ""))


def _early_stop_section(report: _Report, early_stop, ga_s2_sets: dict[int, tuple[int, ...]]) -> None:
    report.add("## Early stop of the selection pass", "")
    if early_stop is None:
        report.note("no early_stop.json given: the early-stop section is skipped.")
        return
    spent, budget = early_stop["tokens_spent"], early_stop["tokens_full_budget"]
    saved = f" ({1 - spent / budget:.0%} fewer than the full pass)" if budget else ""
    at = f"round {early_stop['fired_round']} (step {early_stop['fired_step']})"
    if not early_stop["fired"]:
        outcome = f"the stopping rule did not fire in {len(early_stop['rounds'])} rounds"
    elif early_stop["enabled"]:
        outcome = f"the stopping rule fired at {at}{_job_end_text(early_stop)}"
    else:
        outcome = f"early stop was off; the rule would have fired at {at}"
    report.add(f"{outcome[0].upper()}{outcome[1:]}; the selection pass spent {spent:,.0f} of "
               f"{budget:,.0f} tokens{saved}.", "")
    cost = early_stop.get("selection_cost")
    if isinstance(cost, dict):
        full = cost.get("top_k_full_budget")
        versus = (f"; top-{early_stop['k']} at the stop {cost['top_k_at_stop']}, at the full budget {full} "
                  f"({cost['swaps_between']} swap(s) apart)" if full is not None else "")
        report.add(f"Against the paper's protocol (every one-swap student through a final model's stage 1 and "
                   f"stage 2: {cost['paper_protocol_tokens']:,.0f} tokens), selection up to the stop costs "
                   f"{cost['tokens_to_stop']:,.0f} tokens ({cost['fraction_of_paper']:.1%}; "
                   f"{cost['no_early_stop_tokens']:,.0f} without early stop): one shared stage 1 and brief "
                   f"stage 2 until round {cost['stop_round']}{versus}{_racing_text(early_stop)}.", "")
    k = early_stop["k"]
    fired_rows = early_stop["rounds"][early_stop["rounds"]["round"] == early_stop["fired_round"]]
    if early_stop["fired"] and not fired_rows.empty and k in ga_s2_sets:
        at_stop = sorted(fired_rows["top_k"].iloc[0])
        full = sorted(ga_s2_sets[k])
        report.add(f"Top-{k} at the stop: {', '.join(map(str, at_stop))}; GA-S2 set used for K={k}: "
                   f"{', '.join(map(str, full))} (Jaccard {jaccard(at_stop, full):.2f}).", "")
    if early_stop["rounds"].empty:
        report.note("the early-stop trace has no rounds: no figure.")
        return
    report.figure(figures.plot_early_stop(early_stop, report.figures_dir / "early_stop"),
                  "Early-stop statistics per snapshot")


DECODE_LOOP_TEXT = {"cuda_graph": "one CUDA-graph replay per greedy token on a fixed-address cache",
                    "eager": "HF's eager one-token loop"}


def _decode_loop_line(report: _Report, efficiency) -> None:
    """Say how decoding was timed; warn when models were timed differently, which makes their speeds
    incomparable (an eager loop at small sizes mostly measures kernel launches)."""
    loops = {model: set(rows["decode"]) - {""} for model, rows in efficiency.groupby("model")}
    used = set().union(*loops.values())
    if len(used) == 1:
        report.add(f"Decode tokens/s were timed as {DECODE_LOOP_TEXT[used.pop()]}, for every model.", "")
    elif used:
        timed = "; ".join(f"{model}: {', '.join(sorted(found)) or 'not recorded'}"
                          for model, found in sorted(loops.items()))
        report.note(f"decode tokens/s were timed with different loops ({timed}); compare them with care.")


def _efficiency_section(report: _Report, efficiency) -> None:
    report.add("## Inference efficiency", "")
    if efficiency is None:
        report.note("no efficiency JSONs given: the inference-efficiency section is skipped.")
        return
    report.add("Decode throughput (tokens/s), prefill latency (ms), cache and peak memory (MiB) per model, "
               "context length and batch size; a dash marks a measurement not taken.", "")
    _decode_loop_line(report, efficiency)
    report.table(efficiency_table(efficiency), "efficiency")
    for batch in sorted(set(efficiency["batch"])):
        stem = report.figures_dir / f"efficiency_B{batch}"
        report.figure(figures.plot_efficiency(efficiency, batch, stem), f"Throughput and cache memory, batch {batch}")


def build_report(
    eval_jsons: Sequence[Path],
    efficiency_jsons: Sequence[Path] | None,
    importance_csv: Path | None,
    selection_jsons: Sequence[Path] | None,
    early_stop_json: Path | None,
    out_dir: Path,
    title: str = "Hybrid distillation report",
    report_path: Path | None = None,
    decimals: int = 4,
) -> Path:
    """Write out_dir/{tables,figures}/ and report.md (out_dir/report.md unless `report_path`); return its path.

    Every input is read and checked before anything is written, so a bad file leaves no half-built report.
    Efficiency, importance, selection and early-stop inputs are optional (None or empty skips their section).
    Links in report.md are relative to the report's own directory.
    """
    importance = load_importance(importance_csv) if importance_csv else None
    evals = with_recall_mean(load_evaluations(list(eval_jsons),
                                              num_layers=None if importance is None else len(importance)))
    efficiency = load_efficiency(efficiency_jsons) if efficiency_jsons else None
    selections = load_selections(selection_jsons or [])
    early_stop = load_early_stop(early_stop_json) if early_stop_json else None

    out_dir = Path(out_dir)
    report_path = Path(report_path) if report_path else out_dir / "report.md"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report = _Report(out_dir, report_path)
    report.add(f"# {title}", "", *_headline(evals, decimals))
    report.add("Conventions:", "", *(f"- {line.format(decimals=decimals)}" for line in CONVENTIONS), "")
    _score_sections(report, evals, decimals)
    ga_s2_sets = _ga_s2_sets(evals, selections)
    _importance_section(report, importance, ga_s2_sets)
    _early_stop_section(report, early_stop, ga_s2_sets)
    _efficiency_section(report, efficiency)
    path = write_text_atomic(report_path, "\n".join(report.lines).rstrip("\n") + "\n")
    log.info("wrote %s", path)
    return path
