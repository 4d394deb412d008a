"""The whole report on a small fixed run (L = 8): golden tables and report.md, figures, links, optional inputs.

Expected files live in tests/data/report/expected/. After an intended formatting change, regenerate them with
HD_UPDATE_EXPECTED=1 pytest tests/unit/test_report_build.py and review the diff before committing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from hybrid_distill.report.build import build_report

DATA = Path(__file__).resolve().parents[1] / "data" / "report"
EXPECTED = DATA / "expected"
TITLE = "Hybrid distillation report (test fixture)"


def build(out_dir: Path, efficiency=True, importance=True, selections=True, early_stop=True) -> Path:
    return build_report(
        sorted((DATA / "evaluations").glob("*.json")),
        sorted((DATA / "efficiency").glob("*.json")) if efficiency else None,
        DATA / "importance.csv" if importance else None,
        sorted((DATA / "selections").glob("*.json")) if selections else [],
        DATA / "early_stop.json" if early_stop else None,
        out_dir,
        TITLE,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("report") / "out")


def _text_files(root: Path) -> dict[str, Path]:
    files = {"report.md": root / "report.md"}
    files.update({f"tables/{path.name}": path for path in sorted((root / "tables").iterdir())})
    return files


def test_generated_text_matches_expected_files(report):
    out_dir = report.parent
    generated = _text_files(out_dir)
    if os.environ.get("HD_UPDATE_EXPECTED") == "1":
        shutil.rmtree(EXPECTED, ignore_errors=True)
        (EXPECTED / "tables").mkdir(parents=True)
        for name, path in generated.items():
            shutil.copyfile(path, EXPECTED / name)
    expected = _text_files(EXPECTED)
    assert sorted(generated) == sorted(expected)
    for name in expected:
        assert generated[name].read_text(encoding="utf-8") == expected[name].read_text(encoding="utf-8"), name


def test_every_table_is_written_in_three_formats(report):
    stems = {path.stem for path in (report.parent / "tables").iterdir()}
    assert stems == {"score_recall_mean", "score_niah_single_512", "score_kv_retrieval_512", "score_heldout_ppl",
                     "summary", "softmax_layers", "efficiency"}
    for stem in stems:
        for suffix in ("csv", "tex", "md"):
            assert (report.parent / "tables" / f"{stem}.{suffix}").stat().st_size > 0


def test_figures_are_non_empty_png_and_pdf(report):
    figures = report.parent / "figures"
    stems = {path.stem for path in figures.iterdir()}
    assert stems == {"recall_mean_vs_ratio", "importance_K2", "importance_K4", "early_stop",
                     "efficiency_B1", "efficiency_B8"}
    for stem in stems:
        png = (figures / f"{stem}.png").read_bytes()
        pdf = (figures / f"{stem}.pdf").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000, stem
        assert pdf.startswith(b"%PDF-") and b"%%EOF" in pdf[-64:] and len(pdf) > 2000, stem


def test_report_links_every_table_and_embeds_every_figure(report):
    text = report.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)]+)\)", text)
    assert targets, "report.md has no links"
    for target in targets:
        assert not Path(target).is_absolute() and (report.parent / target).is_file(), target
    linked = set(targets)
    for path in (report.parent / "tables").iterdir():
        assert f"tables/{path.name}" in linked
    embedded = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text))
    assert embedded == {f"figures/{path.name}" for path in (report.parent / "figures").glob("*.png")}
    for path in (report.parent / "figures").glob("*.pdf"):
        assert f"figures/{path.name}" in linked


def test_no_temp_files_are_left_behind(report):
    assert not [path for path in report.parent.rglob("*") if path.name.endswith(".partial")]


def test_missing_optional_inputs_skip_their_sections_with_a_note(tmp_path):
    path = build(tmp_path / "out", efficiency=False, importance=False, selections=False, early_stop=False)
    text = path.read_text(encoding="utf-8")
    assert "> Note: no importance.csv given" in text
    assert "> Note: no early_stop.json given" in text
    assert "> Note: no efficiency JSONs given" in text
    assert not (tmp_path / "out" / "tables" / "efficiency.csv").exists()
    assert {p.stem for p in (tmp_path / "out" / "figures").iterdir()} == {"recall_mean_vs_ratio"}


def test_importance_without_selections_falls_back_to_evaluated_ga_s2_layers(tmp_path):
    build(tmp_path / "out", efficiency=False, selections=False, early_stop=False)
    assert (tmp_path / "out" / "figures" / "importance_K4.png").is_file()


def test_malformed_input_names_the_file_and_writes_nothing(tmp_path):
    bad = tmp_path / "ga_s2_K2.json"
    bad.write_text('{"model": "ga_s2_K2", "kind": "hybrid",')
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        build_report([*sorted((DATA / "evaluations").glob("*.json")), bad], None, None, None, None,
                     tmp_path / "out", TITLE)
    assert not (tmp_path / "out").exists()


def test_summary_paragraph_is_computed_from_the_data(report):
    paragraph = report.read_text(encoding="utf-8").split("\n\n")[1]
    assert "at 25% softmax layers (K=2): GA-S2 0.5765, Uniform 0.4295 and Random 0.3725 ± 0.0318 over 2 seeds" \
        in paragraph
    assert "GA-S2 leads the best baseline by 0.1470" in paragraph
    assert "GA-S2 is best or tied for best at 2 of 2 ratios" in paragraph


def test_report_path_outside_out_dir_gets_relative_links(tmp_path):
    """The workflow writes report.md beside the report folder: results/<run>/report.md + results/<run>/report/."""
    path = build_report(sorted((DATA / "evaluations").glob("*.json")), None, None, None, None,
                        tmp_path / "run" / "report", TITLE, report_path=tmp_path / "run" / "report.md")
    assert path == tmp_path / "run" / "report.md" and not (tmp_path / "run" / "report" / "report.md").exists()
    targets = re.findall(r"\]\(([^)]+)\)", path.read_text(encoding="utf-8"))
    assert "report/tables/summary.csv" in targets and "report/figures/recall_mean_vs_ratio.png" in targets
    assert all((path.parent / target).is_file() for target in targets)


def test_headline_says_when_recall_cannot_separate_and_still_ranks_perplexity(tmp_path):
    """Every hybrid at zero recall (an undertrained run): the headline must not call that a GA-S2 result."""
    evals = []
    for path in sorted((DATA / "evaluations").glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if record["kind"] == "hybrid":
            record["scores"] = {name: (0.0 if "@" in name else value) for name, value in record["scores"].items()}
        evals.append(tmp_path / path.name)
        evals[-1].write_text(json.dumps(record), encoding="utf-8")
    text = build_report(evals, None, None, None, None, tmp_path / "out", TITLE).read_text(encoding="utf-8")
    recall, perplexity = text.split("\n\n")[1:3]
    assert recall.startswith("Mean recall") and "so this score does not separate the selectors" in recall
    assert "leads the best baseline" not in recall
    assert perplexity.startswith("Held-out perplexity (lower is better)")
    assert "GA-S2 11.3500, Uniform 11.9200" in perplexity and "GA-S2 leads the best baseline by 0.5700" in perplexity
    assert "No ratio separates GA-S2 from the baselines on this score." in recall and "best or tied" not in recall


def _efficiency_with_loops(tmp_path: Path, loops: dict[str, str]) -> list[Path]:
    """Copies of the fixture's efficiency JSONs with each row's `decode` set per model."""
    paths = []
    for source in sorted((DATA / "efficiency").glob("*.json")):
        data = json.loads(source.read_text())
        for row in data["rows"]:
            row["decode"] = loops.get(data["model"], "cuda_graph")
        paths.append(tmp_path / source.name)
        paths[-1].write_text(json.dumps(data))
    return paths


def test_report_says_how_decoding_was_timed_and_warns_when_models_differ(tmp_path):
    evaluations = sorted((DATA / "evaluations").glob("*.json"))
    same = build_report(evaluations, _efficiency_with_loops(tmp_path, {}), None, [], None, tmp_path / "same", TITLE)
    assert "timed as one CUDA-graph replay per greedy token on a fixed-address cache, for every model" in \
        same.read_text(encoding="utf-8")
    teacher = json.loads(sorted((DATA / "efficiency").glob("*.json"))[0].read_text())["model"]
    (tmp_path / "mixed").mkdir()
    mixed = build_report(evaluations, _efficiency_with_loops(tmp_path / "mixed", {teacher: "eager"}), None, [], None,
                         tmp_path / "mixed_out", TITLE).read_text(encoding="utf-8")
    assert "> Note: decode tokens/s were timed with different loops" in mixed and f"{teacher}: eager" in mixed
    assert "for every model" not in mixed


def test_a_stop_at_the_end_of_a_longer_job_says_where_scoring_stopped(tmp_path):
    early_stop = json.loads((DATA / "early_stop.json").read_text())  # fired at round 5 (step 12) of 6
    for stopped, expected in ((5, False), (None, False)):
        (tmp_path / "early_stop.json").write_text(json.dumps({**early_stop, "stopped_at_round": stopped}))
        text = build_report(sorted((DATA / "evaluations").glob("*.json")), None, None, [],
                            tmp_path / "early_stop.json", tmp_path / f"out{stopped}", TITLE).read_text()
        assert ("scoring stopped where that job ended" in text) is expected
    rounds = [*early_stop["rounds"], {**early_stop["rounds"][-1], "round": 6, "step": 14}]
    (tmp_path / "early_stop.json").write_text(json.dumps({**early_stop, "rounds": rounds, "stopped_at_round": 6}))
    text = build_report(sorted((DATA / "evaluations").glob("*.json")), None, None, [], tmp_path / "early_stop.json",
                        tmp_path / "out6", TITLE).read_text()
    assert "stopping rule fired at round 5 (step 12) and scoring stopped where that job ended, round 6 " \
           "(step 14)" in text.replace("\n", " ")


def test_a_raced_selection_pass_says_how_many_layers_raced_on(tmp_path):
    early_stop = json.loads((DATA / "early_stop.json").read_text())
    (tmp_path / "early_stop.json").write_text(json.dumps({**early_stop, "racing": {"keep": 6, "from_tokens": 2048}}))
    path = build_report(sorted((DATA / "evaluations").glob("*.json")), None, None, [], tmp_path / "early_stop.json",
                        tmp_path / "out", TITLE)
    assert "racing kept the 6 best-ranked layers training once each had trained 2,048 tokens" in path.read_text()
    plain = build(tmp_path / "plain", efficiency=False, importance=False, selections=False)
    assert "racing kept" not in plain.read_text()
