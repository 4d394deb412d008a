"""The local rules' steps (round decisions, ranking, early_stop.json, selections, greedy picks) and the planning
command run without importing torch: on a cluster they run on the head node between rounds (or on a login node),
where a torch import can take longer than the step. Each is run for real in one fresh interpreter, and its output
checked."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

PAPER_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "paper-qwen2.5-3b.yaml"
KL = {(0, 0): 2.0, (0, 1): 1.5, (1, 0): 1.8, (1, 1): 1.2}  # (round, layer) -> held-out KL; layer 1 is best


def test_bookkeeping_steps_run_without_torch_and_write_their_results(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"run": "light", "teacher": {"spec": "unused"}}))
    scores = {}
    for (round_index, layer), kl in KL.items():
        scores[round_index, layer] = tmp_path / f"layer{layer}_round{round_index}.json"
        scores[round_index, layer].write_text(json.dumps({
            "heldout_kl": kl, "step": round_index + 1, "tokens": 64 * (round_index + 1),
            "budget_exhausted": round_index == 1, "softmax_layers": [layer]}))
    last = [str(scores[1, layer]) for layer in (0, 1)]
    every_round = [str(scores[r, layer]) for r in (0, 1) for layer in (0, 1)]
    decisions = [str(tmp_path / f"decision{r}.json") for r in (0, 1)]
    config = str(tmp_path / "config.yaml")
    steps = [
        ["check-round", "--config", config, "--layers", "2", "--k", "1", "--max-rounds", "2",
         "--scores", *every_round, "--out", *decisions],
        ["rank-layers", "--scores", *last, "--out", str(tmp_path / "importance.csv")],
        ["write-early-stop", "--config", config, "--layers", "2", "--decisions", *decisions, "--scores", *every_round,
         "--full-budget", "256", "--out", str(tmp_path / "early_stop.json")],
        ["select-layers", "--selector", "ga_s2", "--k", "1", "--num-layers", "2",
         "--importance", str(tmp_path / "importance.csv"), "--out", str(tmp_path / "ga_s2_K1.json")],
        ["removal-signal", "--scores", *last, "--out", str(tmp_path / "gr_s2.json")],
        ["choose-greedy-layer", "--step", "0", "--num-layers", "2", "--candidates", "0,1", "--scores", *last,
         "--out", str(tmp_path / "greedy_step0.json")],
        ["plan-selection", "--config", str(PAPER_CONFIG)],  # a user's planning command, on a login node
    ]
    script = textwrap.dedent(f"""
        import sys
        from hybrid_distill.cli import main
        for argv in {steps!r}:
            if main(["--threads", "2", *argv]) != 0:
                sys.exit(f"step failed: {{argv[0]}}")
        print("torch imported:", "torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch imported: False" in result.stdout
    assert "selection pass of `paper-qwen2.5-3b`: 36 layers" in result.stdout
    assert "selection pass: top-1 [1] after round 1; the rule did not fire;" in result.stderr  # write-early-stop
    assert "layers by one-swap held-out KL, best first: 1 (1.2), 0 (1.8)" in result.stderr  # rank-layers
    assert "ga_s2 at K=1: softmax layers [1]" in result.stderr  # select-layers
    assert "compiled kernels" not in result.stderr  # the kernel cache is a torch step's concern

    first, second = (json.loads((tmp_path / f"decision{r}.json").read_text()) for r in (0, 1))
    assert (first["stop"], second["stop"]) == (False, True) and second["top_k"] == [1]
    with open(tmp_path / "importance.csv") as handle:
        ranks = {int(row["layer"]): int(row["rank"]) for row in csv.DictReader(handle)}
    assert ranks == {1: 1, 0: 2}
    early_stop = json.loads((tmp_path / "early_stop.json").read_text())
    assert early_stop["top_k"] == [1] and early_stop["stopped_at_round"] == 1
    assert json.loads((tmp_path / "ga_s2_K1.json").read_text())["softmax_layers"] == [1]
    assert json.loads((tmp_path / "gr_s2.json").read_text())["gr_s2"] == {"0": 1.8, "1": 1.2}
    assert json.loads((tmp_path / "greedy_step0.json").read_text())["chosen"] == [1]
