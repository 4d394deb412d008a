"""Table logic and the three writers: best-value marking, seed pooling, ratio columns, LaTeX/Markdown/CSV form."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from hybrid_distill.report.collect import load_efficiency, load_evaluations
from hybrid_distill.report.csv_table import to_csv
from hybrid_distill.report.efficiency_table import efficiency_table
from hybrid_distill.report.latex import escape as latex_escape
from hybrid_distill.report.latex import to_latex
from hybrid_distill.report.layout import mark_best
from hybrid_distill.report.markdown import escape as markdown_escape
from hybrid_distill.report.markdown import to_markdown
from hybrid_distill.report.naming import model_label, percent_label, seed_from_model
from hybrid_distill.report.tables import layers_table, score_table, summary_table, with_recall_mean

DATA = Path(__file__).resolve().parents[1] / "data" / "report"


@pytest.fixture(scope="module")
def evals():
    return with_recall_mean(load_evaluations(sorted((DATA / "evaluations").glob("*.json"))))


def rows_by_label(table):
    return {row.labels[0]: row for block in table.blocks for row in block.rows}


def write_evals(directory: Path, specs: list[dict]) -> list[Path]:
    """Evaluation JSONs from short specs; `scores` defaults to one recall task."""
    paths = []
    for spec in specs:
        kind = spec.get("kind", "hybrid")
        data = {"model": spec["model"], "kind": kind, "selector": spec.get("selector"), "k": spec.get("k"),
                "ratio": spec.get("ratio"), "mixer": None if kind == "teacher" else "gdn",
                "softmax_layers": spec.get("layers", []),
                "scores": spec["scores"]}
        for key in ("teacher", "mixer"):
            if key in spec:
                data[key] = spec[key]
        path = directory / f"{spec.get('teacher', '')}{spec['model']}.json"
        path.write_text(json.dumps(data))
        paths.append(path)
    return paths


def test_bold_marks_the_highest_hybrid_and_ignores_reference_rows(evals):
    rows = rows_by_label(score_table(evals, "niah_single@512"))
    assert [cell.bold for cell in rows["GA-S2"].cells] == [True, True]
    assert not any(cell.bold for label in ("Teacher", "All-linear", "Uniform", "Random (2 seeds)")
                   for cell in rows[label].cells)
    assert rows["Teacher"].cells[0].value == pytest.approx(0.982)  # higher than every hybrid, still not bold


def test_bold_respects_lower_is_better_for_heldout_scores(evals):
    rows = rows_by_label(score_table(evals, "heldout_ppl"))
    assert [cell.bold for cell in rows["GA-S2"].cells] == [True, True]  # lowest perplexity
    assert [cell.bold for cell in rows["Random (2 seeds)"].cells] == [False, False]  # highest perplexity


def test_ties_are_all_bold(evals):
    rows = rows_by_label(score_table(evals, "kv_retrieval@512"))
    assert rows["Uniform"].cells[1].bold and rows["GA-S2"].cells[1].bold  # both 0.63 at 50%
    assert not rows["Uniform"].cells[0].bold


def test_mark_best_judges_the_printed_values():
    assert mark_best([0.12344, 0.12341, 0.1], lower_is_better=False, decimals=4) == [True, True, False]
    assert mark_best([0.12344, 0.12341, 0.1], lower_is_better=True, decimals=4) == [False, False, True]
    assert mark_best([None, float("nan"), 2.0], lower_is_better=False, decimals=4) == [False, False, True]
    assert mark_best([None, None], lower_is_better=False, decimals=4) == [False, False]


def test_random_seeds_are_pooled_as_mean_and_sample_std(evals):
    random = rows_by_label(score_table(evals, "niah_single@512"))["Random (2 seeds)"]
    assert random.cells[0].value == pytest.approx(0.5)
    assert random.cells[0].std == pytest.approx(statistics.stdev([0.48, 0.52]))
    assert random.cells[1].value == pytest.approx(0.83)
    assert random.cells[1].std == pytest.approx(statistics.stdev([0.80, 0.86]))
    assert rows_by_label(score_table(evals, "niah_single@512"))["GA-S2"].cells[0].std is None


def test_recall_mean_is_taken_per_seed_before_pooling(evals):
    random = rows_by_label(score_table(evals, "recall_mean"))["Random (2 seeds)"]
    per_seed = [(0.8 + 0.55) / 2, (0.86 + 0.51) / 2]
    assert random.cells[1].value == pytest.approx(statistics.mean(per_seed))
    assert random.cells[1].std == pytest.approx(statistics.stdev(per_seed))


def test_three_seeds_and_a_missing_cell(tmp_path):
    specs = [{"model": f"random_s{seed}_K2", "selector": "random", "k": 2, "ratio": 0.25,
              "scores": {"task": value}} for seed, value in enumerate([0.1, 0.4, 0.7])]
    specs.append({"model": "uniform_K4", "selector": "uniform", "k": 4, "ratio": 0.5, "scores": {"task": 0.9}})
    table = score_table(load_evaluations(write_evals(tmp_path, specs)), "task")
    rows = rows_by_label(table)
    assert rows["Random (3 seeds)"].cells[0].std == pytest.approx(0.3)
    assert rows["Random (3 seeds)"].cells[1].value is None
    assert "Random (3 seeds) & \\textbf{0.4000} $\\pm$ 0.3000 & -- \\\\" in to_latex(table)
    assert "| Random (3 seeds) | **0.4000** ± 0.3000 | – |" in to_markdown(table)
    assert "Heuristic,Random (3 seeds),0.4,,0.3,\n" in to_csv(table)


@pytest.mark.parametrize(("ratio", "label"), [(0.125, "12.5%"), (0.25, "25%"), (1 / 3, "33.3%"), (0.5, "50%"),
                                              (1.0, "100%")])
def test_percent_labels(ratio, label):
    assert percent_label(ratio) == label


def test_missing_ratio_is_k_over_the_teachers_layer_count(tmp_path):
    paths = write_evals(tmp_path, [
        {"model": "teacher", "kind": "teacher", "layers": list(range(12)), "scores": {"task": 1.0}},
        {"model": "ga_s2_K4", "selector": "ga_s2", "k": 4, "scores": {"task": 0.5}},
    ])
    table = score_table(load_evaluations(paths), "task")
    assert [column.label for column in table.columns] == ["33.3%"]


def test_missing_ratio_without_a_layer_count_names_the_file(tmp_path):
    paths = write_evals(tmp_path, [{"model": "ga_s2_K4", "selector": "ga_s2", "k": 4, "scores": {"task": 0.5}}])
    with pytest.raises(ValueError, match="ga_s2_K4.json: 'ratio' is null"):
        load_evaluations(paths)
    assert load_evaluations(paths, num_layers=16)["ratio"].iloc[0] == 0.25


def test_paper_layout_rows_groups_and_ratio_columns(evals):
    table = score_table(evals, "recall_mean")
    assert [column.label for column in table.columns] == ["25%", "50%"]
    assert [(block.title, block.show_title, [row.labels[0] for row in block.rows]) for block in table.blocks] == [
        ("Reference", False, ["Teacher", "All-linear"]),
        ("Heuristic", True, ["Uniform", "Random (2 seeds)"]),
        ("Learning-based", True, ["GA-S2"]),
    ]
    teacher = rows_by_label(table)["Teacher"]
    assert teacher.cells[0].value == teacher.cells[1].value == pytest.approx((0.982 + 0.861) / 2)


def test_latex_is_a_booktabs_tabular(evals):
    text = to_latex(score_table(evals, "heldout_ppl"))
    lines = text.splitlines()
    assert lines[0] == r"\begin{tabular}{lrr}" and lines[1] == r"\toprule"
    assert lines[-2:] == [r"\bottomrule", r"\end{tabular}"] and text.endswith("\n")
    assert text.count(r"\midrule") == 3  # after the header, then between the three row groups
    assert r"\multicolumn{3}{l}{\textit{Learning-based}} \\" in lines
    for line in lines:
        if line.endswith(r"\\") and r"\multicolumn" not in line:
            assert line.count(" & ") == 2, line
    assert text.count(r"\textbf{") == 2 and r"25\%" in text and "±" not in text


def test_multi_teacher_columns_get_a_spanning_header(tmp_path):
    specs = []
    for teacher, scale in (("Llama-3.2-3B", 1.0), ("Qwen2.5-3B", 0.9)):
        specs += [{"model": "teacher", "kind": "teacher", "teacher": teacher, "layers": list(range(8)),
                   "scores": {"task": scale}},
                  {"model": "ga_s2_K2", "selector": "ga_s2", "k": 2, "ratio": 0.25, "teacher": teacher,
                   "scores": {"task": 0.5 * scale}},
                  {"model": "uniform_K2", "selector": "uniform", "k": 2, "ratio": 0.25, "teacher": teacher,
                   "scores": {"task": 0.6 * scale}}]
    table = score_table(load_evaluations(write_evals(tmp_path, specs)), "task")
    text = to_latex(table)
    assert r" & \multicolumn{1}{c}{Llama-3.2-3B} & \multicolumn{1}{c}{Qwen2.5-3B} \\" in text
    assert r"\cmidrule(lr){2-2} \cmidrule(lr){3-3}" in text
    assert "| Selector | Llama-3.2-3B 25% | Qwen2.5-3B 25% |" in to_markdown(table)
    assert [cell.bold for cell in rows_by_label(table)["Uniform"].cells] == [True, True]


def test_unknown_selectors_go_to_an_other_group_with_escaped_names(tmp_path):
    paths = write_evals(tmp_path, [
        {"model": "my_sel_K2", "selector": "my_sel", "k": 2, "ratio": 0.25, "scores": {"task": 0.5}},
        {"model": "ga_s2_K2", "selector": "ga_s2", "k": 2, "ratio": 0.25, "scores": {"task": 0.4}},
    ])
    table = score_table(load_evaluations(paths), "task")
    assert [block.title for block in table.blocks] == ["Learning-based", "Other"]
    assert r"my\_sel & \textbf{0.5000} \\" in to_latex(table)
    assert r"| my\_sel | **0.5000** |" in to_markdown(table)


def test_escaping():
    assert latex_escape(r"a_b & 50% $x$ #1 {y} ~z ^w \q") == (
        r"a\_b \& 50\% \$x\$ \#1 \{y\} \textasciitilde{}z \textasciicircum{}w \textbackslash{}q")
    assert markdown_escape("a|b *c* _d_ [e]") == r"a\|b \*c\* \_d\_ \[e\]"


def test_recall_mean_is_missing_for_a_model_without_every_recall_task(tmp_path):
    paths = write_evals(tmp_path, [
        {"model": "ga_s2_K2", "selector": "ga_s2", "k": 2, "ratio": 0.25, "scores": {"a": 0.4, "b": 0.6}},
        {"model": "uniform_K2", "selector": "uniform", "k": 2, "ratio": 0.25, "scores": {"a": 0.4}},
    ])
    rows = rows_by_label(score_table(with_recall_mean(load_evaluations(paths)), "recall_mean"))
    assert rows["GA-S2"].cells[0].value == pytest.approx(0.5)
    assert rows["Uniform"].cells[0].value is None


def test_summary_blocks_per_ratio_with_bold_per_block(evals):
    table = summary_table(evals)
    assert [column.label for column in table.columns] == ["Recall mean", "heldout_ppl"]
    assert [block.title for block in table.blocks] == ["Reference", "25% softmax (K=2)", "50% softmax (K=4)"]
    for block in table.blocks[1:]:
        ga_s2 = next(row for row in block.rows if row.labels[0] == "GA-S2")
        assert [cell.bold for cell in ga_s2.cells] == [True, True]


def test_layers_table_lists_each_seed(evals):
    rows = rows_by_label(layers_table(evals))
    assert rows["GA-S2"].cells[1].value == "0, 1, 5, 6"
    assert rows["Random"].cells[0].value == "s0: 5, 7; s1: 3, 4"


def test_efficiency_table_converts_units_and_drops_unmeasured_columns():
    table = efficiency_table(load_efficiency(sorted((DATA / "efficiency").glob("*.json"))))
    assert [column.group for column in table.columns] == ["Decode tok/s"] * 2 + ["Prefill ms"] * 2 + ["Cache MiB"] * 2
    assert [block.rows[0].labels[0] for block in table.blocks] == ["Teacher", "All-linear", "GA-S2 K=2", "GA-S2 K=4"]
    teacher_8192 = table.blocks[0].rows[2]
    assert teacher_8192.labels == ("Teacher", "8192")
    assert teacher_8192.cells[4].value == pytest.approx(32.0)  # 8 layers x 8192 tokens x 512 B = 32 MiB
    assert teacher_8192.cells[2].value == pytest.approx(8.19)  # 0.00819 s
    assert "\n & 2048 & 328.0 & 1943.7 & 2.05 & 16.38 & 8.0 & 64.0 \\\\\n" in to_latex(table)


def test_efficiency_table_keeps_peak_memory_when_measured(tmp_path):
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps({"model": "teacher", "kind": "teacher", "k": None, "rows": [
        {"context": 512, "batch": 1, "prefill_s": None, "decode_tok_s": 100.0, "cache_bytes": 2**20,
         "peak_mem_bytes": 3 * 2**20}]}))
    table = efficiency_table(load_efficiency([path]))
    assert [column.group for column in table.columns] == ["Decode tok/s", "Cache MiB", "Peak MiB"]
    assert [cell.value for cell in table.blocks[0].rows[0].cells] == [100.0, 1.0, 3.0]


def test_model_labels_and_seeds():
    assert seed_from_model("random_s1_K4", "random") == 1
    assert seed_from_model("ga_s2_K4", "ga_s2") is None
    assert model_label("ga_s2_K4", "hybrid", 4) == "GA-S2 K=4"
    assert model_label("random_s3_K4", "hybrid", 4) == "Random K=4 (seed 3)"
    assert model_label("all_linear", "all_linear", None) == "All-linear"
    assert model_label("smart_K4", "hybrid", 4) == "smart_K4"


def test_two_mixers_split_columns_and_share_the_teacher_row(tmp_path):
    """The workflow's layout: one teacher (mixer null), then all-linear and hybrids per mixer, same names."""
    paths = write_evals(tmp_path, [{"model": "teacher", "kind": "teacher", "layers": list(range(8)),
                                    "scores": {"task": 0.9}}])
    for mixer, scale in (("gdn", 1.0), ("gla", 0.8)):
        (tmp_path / mixer).mkdir()
        paths += write_evals(tmp_path / mixer, [
            {"model": "all_linear", "kind": "all_linear", "mixer": mixer, "scores": {"task": 0.1 * scale}},
            {"model": "ga_s2_K2", "selector": "ga_s2", "k": 2, "ratio": 0.25, "mixer": mixer,
             "scores": {"task": 0.6 * scale}},
            {"model": "random_seed0_K2", "selector": "random", "k": 2, "ratio": 0.25, "mixer": mixer,
             "scores": {"task": 0.5 * scale}},
            {"model": "random_seed1_K2", "selector": "random", "k": 2, "ratio": 0.25, "mixer": mixer,
             "scores": {"task": 0.3 * scale}},
        ])
    evals = with_recall_mean(load_evaluations(paths))
    assert set(evals.loc[evals["selector"] == "random", "seed"]) == {0, 1}
    table = score_table(evals, "task")
    assert [(column.group, column.label) for column in table.columns] == [("GDN", "25%"), ("GLA", "25%")]
    rows = rows_by_label(table)
    assert [cell.value for cell in rows["Teacher"].cells] == [0.9, 0.9]
    assert [cell.value for cell in rows["All-linear"].cells] == pytest.approx([0.1, 0.08])
    assert rows["Random (2 seeds)"].cells[1].value == pytest.approx(0.32)
    assert [block.title for block in summary_table(evals).blocks] == [
        "GDN", "GDN, 25% softmax (K=2)", "GLA", "GLA, 25% softmax (K=2)"]


def test_efficiency_labels_name_the_mixer_when_there_are_several(tmp_path):
    paths = []
    for mixer, model, kind, k in ((None, "teacher", "teacher", None), ("gdn", "ga_s2_K2", "hybrid", 2),
                                  ("gla", "ga_s2_K2", "hybrid", 2), ("gla", "all_linear", "all_linear", None)):
        path = tmp_path / f"{mixer}_{model}.json"
        path.write_text(json.dumps({"model": model, "kind": kind, "k": k, "mixer": mixer, "rows": [
            {"context": 512, "batch": 1, "prefill_s": 0.01, "decode_tok_s": 100.0, "cache_bytes": 2**20,
             "peak_mem_bytes": None}]}))
        paths.append(path)
    table = efficiency_table(load_efficiency(paths))
    assert [block.rows[0].labels[0] for block in table.blocks] == [
        "Teacher", "GA-S2 K=2, GDN", "All-linear, GLA", "GA-S2 K=2, GLA"]
