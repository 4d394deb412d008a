"""Bench results side by side, read from real H200 results (docs/results/conv_grads_in_place_h200/, session 21):
the comparison must show what docs/performance.md reports for that change."""
import json
from pathlib import Path

import pytest

from hybrid_distill.distill.bench_compare import (format_comparison, kernel_changes, load_result, row_table,
                                                  differing_options)

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "conv_grads_in_place_h200"
SPLIT, IN_PLACE = RESULTS / "0_graph_gdn_split.json", RESULTS / "1_graph_gdn_in_place.json"


def test_the_in_place_conv_gradients_gain_what_the_notes_report():
    """Session 21: 229,001 -> 231,761 tok/s (+1.2%), the concatenation's 2.92 ms gone, switched by one option."""
    split, in_place = load_result(SPLIT), load_result(IN_PLACE)
    (entry,) = row_table([split, in_place])
    assert entry["key"] == ("stage2", "gdn", "project")
    base, other = entry["cells"]
    assert round(base["tokens_per_s"]) == 229001 and round(other["tokens_per_s"]) == 231761
    assert other["change"] == pytest.approx(231761.1 / 229001.1 - 1, abs=1e-6)
    assert base["step_ms"] == pytest.approx(32768 / 229001.1 * 1e3, rel=1e-6)
    assert differing_options([split, in_place]) == {"hd_conv_grads_in_place": [None, "on"]}
    (gone,) = kernel_changes(split["rows"][0], in_place["rows"][0], min_ms=0.5)
    assert gone["name"] == "triton_poi_fused_cat_zeros_0" and gone["ms"] is None
    assert gone["moved_ms"] == pytest.approx(-2.92, abs=0.01)
    text = format_comparison([split, in_place], ["split", "in_place"])
    assert "+1.21%" in text and "32.23 ->    29.34 ( -2.89)  compiled (Inductor)" in text


def bench_result(rows, tokens_per_step=1000, **options):
    return {"tokens_per_step": tokens_per_step, "device": "cpu", "matmul_bf16_flops": None, "options": options,
            "rows": [{"stage": "stage2", "student": student, "step": "project", "tokens_per_s": speed, "mfu": None,
                      "peak_mem_gb": None, "note": ""} for student, speed in rows]}


def test_rows_one_file_lacks_are_shown_missing_not_dropped():
    base = bench_result([("softmax", 2000.0), ("gdn", 1000.0)], compile_kl=False)
    other = bench_result([("gdn", 1100.0), ("gla", 900.0)], compile_kl=True)
    table = {entry["key"][1]: entry["cells"] for entry in row_table([base, other])}
    assert list(table) == ["softmax", "gdn", "gla"]  # the baseline's order, then the new rows
    assert table["softmax"][1] is None and table["gla"][0] is None
    assert table["gdn"][1]["change"] == pytest.approx(0.1)
    assert table["gla"][1]["change"] is None  # nothing to compare with
    text = format_comparison([base, other], ["base", "other"])
    assert "compile_kl: base False, other True" in text and "(no such row)" in text


def test_a_kernel_below_the_threshold_is_not_listed():
    base = {"top_kernels": [{"name": "a", "ms": 1.0, "calls": 2}, {"name": "b", "ms": 1.0, "calls": 2}]}
    other = {"top_kernels": [{"name": "a", "ms": 1.1, "calls": 2}, {"name": "b", "ms": 1.5, "calls": 3},
                             {"name": "c", "ms": 0.3, "calls": 1}]}
    assert [(change["name"], change["moved_ms"]) for change in kernel_changes(base, other, 0.2)] == \
        [("b", pytest.approx(0.5)), ("c", pytest.approx(0.3))]


@pytest.mark.parametrize("content, named", [("{not json", "not a readable bench result"),
                                            (json.dumps({"rows": []}), "not a bench result")])
def test_a_file_that_is_not_a_bench_result_is_named(tmp_path, content, named):
    path = tmp_path / "result.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{path}: {named}"):
        load_result(path)


def test_the_mfu_with_attention_shows_where_a_result_has_it():
    """Results written before session 31 lack it: their cells show a dash, not a zero."""
    old = bench_result([("softmax", 2000.0)])
    new = bench_result([("softmax", 2100.0)])
    old["rows"][0]["mfu"] = 0.390
    new["rows"][0].update(mfu=0.396, mfu_with_attention=0.422)
    lines = format_comparison([old, new], ["old", "new"]).splitlines()
    assert "MFU+attn" in next(line for line in lines if "tok/s" in line)
    old_line = next(line for line in lines if line.strip().startswith("old "))
    new_line = next(line for line in lines if line.strip().startswith("new "))
    assert old_line.split()[4:6] == ["39.0%", "-"] and new_line.split()[4:6] == ["39.6%", "42.2%"]
