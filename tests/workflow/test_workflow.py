"""The real Snakefile on a tiny random teacher: planning, the whole DAG, resume, lint."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflow_helpers import REPO, bare_env, run_snakemake, tiny_config

pytestmark = pytest.mark.workflow


def job_counts(dry_run_output: str) -> dict[str, int]:
    """Parse Snakemake's 'job count' table."""
    counts, in_table = {}, False
    for line in dry_run_output.splitlines():
        if line.startswith("job ") and "count" in line:
            in_table = True
            continue
        if in_table:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
            elif parts and parts[0] == "total":
                break
    return counts


@pytest.mark.parametrize("config_name, layers, ks", [
    ("paper-qwen2.5-3b.yaml", 36, [4, 9, 12, 18]),
    ("paper-llama3.2-3b.yaml", 28, [3, 7, 9, 14]),
])
def test_paper_configs_plan_offline_with_one_job_per_layer(config_name, layers, ks, tmp_path):
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
               "--configfile", str(REPO / "configs" / config_name), "-n", "--cores", "8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=bare_env())
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout)
    assert counts["score_layer"] == layers              # round 0 of every one-swap run; later rounds are live
    assert counts["score_removal"] == layers            # GR-S2 is on in the paper configs
    selections_per_k = 1 + 1 + 3 + 1 + 1                # ga_s2, uniform, 3 random seeds, gr_s2, avg_s2
    assert counts["distill_hybrid"] == len(ks) * selections_per_k
    assert counts["distill_all_linear_stage1"] == 1
    assert "huggingface.co" not in result.stdout + result.stderr


def test_paper_config_with_ga_iter_plans_every_greedy_step(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "paper-qwen2.5-3b.yaml").read_text())
    config["selection"]["selectors"].append("ga_iter")
    (tmp_path / "paper-ga-iter.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
               "--configfile", str(tmp_path / "paper-ga-iter.yaml"), "-n", "--cores", "8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=bare_env())
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout)
    assert counts["choose_greedy_layer"] == 18          # steps 0..Kmax-1; their scoring jobs follow each step
    assert counts["score_layer"] == 36                  # step 0's jobs are GA-S2's one-swap jobs
    assert counts["distill_hybrid"] == 4 * 8


# Two selectors: the random baseline's jobs are a third copy of the same rules (the config-edit test plans them).
WHOLE_DAG = {"selection.selectors": ["ga_s2", "uniform"]}


@pytest.fixture(scope="module")
def finished_run(tiny_teacher_dir, tmp_path_factory) -> Path:
    """The tiny config's whole DAG, run once: the end-to-end test checks it; later tests plan or run edits of it."""
    workdir = tmp_path_factory.mktemp("whole_dag") / "run"
    result = run_snakemake(workdir, tiny_config(tiny_teacher_dir, **WHOLE_DAG))
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir


def copy_of_run(workdir: Path, tmp_path: Path, only: tuple[str, ...] | None = None) -> Path:
    """A finished run copied with its timestamps and Snakemake's records, so that Snakemake sees what is done;
    `only` these paths of it when given."""
    copy = tmp_path / "run"
    for part in only or (".",):
        shutil.copytree(workdir / part, copy / part, symlinks=True)
    return copy


# The finished run's teacher, data and stage 1: scoring tests with other scoring settings start from them.
BEFORE_SCORING = (".snakemake", "results/tiny/config", "results/tiny/teacher", "results/tiny/data",
                  "results/tiny/gdn/all_linear/stage1")


def test_whole_dag_runs_end_to_end(finished_run):
    root = finished_run / "results" / "tiny"
    with open(root / "gdn" / "selection" / "importance.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["layer"]) for r in rows] == [0, 1, 2, 3]
    assert sorted(int(r["rank"]) for r in rows) == [1, 2, 3, 4]
    early_stop = json.loads((root / "gdn" / "selection" / "early_stop.json").read_text())
    assert early_stop["tokens_spent"] <= early_stop["tokens_full_budget"]
    for k in (1, 2):
        for selection in ("ga_s2", "uniform"):
            chosen = json.loads((root / "gdn" / "selection" / f"{selection}_K{k}.json").read_text())
            assert len(chosen["softmax_layers"]) == k
            model_dir = root / "gdn" / "hybrid" / f"{selection}_K{k}" / "stage2"
            config = json.loads((model_dir / "config.json").read_text())
            assert config["hybrid"]["softmax_layers"] == chosen["softmax_layers"]
            assert not (model_dir / "state").exists()
            evaluation = json.loads((root / "gdn" / "eval" / f"{selection}_K{k}.json").read_text())
            assert 0.0 <= evaluation["scores"]["niah_single@128"] <= 1.0
    ga = json.loads((root / "gdn" / "selection" / "ga_s2_K1.json").read_text())["softmax_layers"]
    best = min(rows, key=lambda r: int(r["rank"]))
    assert ga == [int(best["layer"])]
    assert (root / "report.md").is_file()
    assert list((root / "report" / "tables").glob("*.tex"))
    recorded = yaml.safe_load((root / "config.yaml").read_text())  # the whole resolved config, for the record
    assert recorded["selection"]["selectors"] == ["ga_s2", "uniform"]
    # every job keeps compiled kernels in the run's shared kernel cache, unless the environment already chose one
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(finished_run / "results/.kernel_cache/inductor")
    stage1_log = (root / "logs" / "gdn" / "distill_all_linear_stage1.log").read_text()
    assert f"TORCHINDUCTOR_CACHE_DIR={inductor}," in stage1_log


def test_an_added_selector_or_evaluation_task_retrains_nothing_already_trained(tiny_teacher_dir, finished_run):
    """A config edit reruns only the jobs whose slice of the config it touches (config/reads.py)."""
    def plan(**overrides) -> dict[str, int]:
        result = run_snakemake(finished_run, tiny_config(tiny_teacher_dir, **{**WHOLE_DAG, **overrides}), "-n")
        assert result.returncode == 0, result.stderr[-5000:]
        return job_counts(result.stdout)

    assert set(plan()) <= {"write_run_config"}  # nothing left to do but record the config again
    new_selectors = plan(**{"selection.selectors": ["ga_s2", "uniform", "random", "act_mse"]})
    assert new_selectors["distill_hybrid"] == 4 and new_selectors["score_bypass"] == 1  # 2 new, at K = 1 and 2
    new_task = plan(**{"evaluate.recall_tasks": ["niah_single", "kv_retrieval"]})
    assert new_task["evaluate_model"] == 5 and new_task["make_recall_data"] == 1  # 4 hybrids and the all-linear
    new_stage2 = plan(**{"distill.stage2.lr": 0.0003})
    assert new_stage2["distill_all_linear_stage2"] == 1 and new_stage2["distill_hybrid"] == 4
    for planned in (new_selectors, new_task, new_stage2):
        assert not {"prepare_teacher", "prepare_data", "distill_all_linear_stage1"} & set(planned), planned
    assert not {"score_layer", "distill_all_linear_stage2"} & (set(new_selectors) | set(new_task))


# 4 rounds of one step, K = 1, keep 2 layers from the first round on; a window of 10 never fires in 4 rounds
RACING = {"scoring.early_stop.window": 10, "scoring.racing": {"enabled": True, "from_fraction": 0.25, "keep_factor": 2}}


@pytest.fixture(scope="module")
def live_racing_run(tiny_teacher_dir, finished_run, tmp_path_factory) -> Path:
    workdir = copy_of_run(finished_run, tmp_path_factory.mktemp("live_racing"), only=BEFORE_SCORING)
    result = run_snakemake(workdir, tiny_config(tiny_teacher_dir, **RACING),
                           "results/tiny/gdn/selection/early_stop.json", "results/tiny/gdn/selection/importance.csv")
    assert result.returncode == 0, result.stderr[-5000:]
    assert not re.search(r"^(local)?rule (prepare_data|distill_all_linear_stage1):", result.stdout, re.MULTILINE)
    return workdir / "results" / "tiny" / "gdn"


def test_live_racing_schedules_no_further_rounds_for_raced_out_layers(live_racing_run):
    root = live_racing_run
    first = json.loads((root / "selection" / "rounds" / "round0.json").read_text())
    assert len(first["racing"]) == 2
    for layer in range(4):
        rounds = sorted(path.name for path in (root / "swap" / f"layer{layer}").glob("round*.json"))
        assert rounds == ([f"round{r}.json" for r in range(4)] if layer in first["racing"] else ["round0.json"])
        assert not (root / "swap" / f"layer{layer}" / "stage2" / "state").exists()
    early_stop = json.loads((root / "selection" / "early_stop.json").read_text())
    assert early_stop["tokens_spent"] == (4 + 2 * 3) * 64 < early_stop["tokens_full_budget"] == 4 * 4 * 64
    assert [entry["racing_layers"] for entry in early_stop["rounds"]] == [2, 2, 2, 2]
    with open(root / "selection" / "importance.csv") as handle:
        ranked = sorted(csv.DictReader(handle), key=lambda row: int(row["rank"]))
    assert {int(row["layer"]) for row in ranked[:2]} == set(first["racing"])


def test_live_jobs_of_two_rounds_halve_the_jobs_and_race_where_a_job_ends(tiny_teacher_dir, tmp_path, finished_run,
                                                                          live_racing_run):
    config = tiny_config(tiny_teacher_dir, **RACING, **{"scoring.snapshots_per_job": 2})
    workdir = copy_of_run(finished_run, tmp_path, only=BEFORE_SCORING)
    result = run_snakemake(workdir, config, "results/tiny/gdn/selection/early_stop.json")
    assert result.returncode == 0, result.stderr[-5000:]
    root = tmp_path / "run" / "results" / "tiny"
    checks = sorted(path.name for path in (root / "logs" / "gdn" / "check_early_stop").iterdir())
    assert checks == ["round1.log", "round3.log"]  # one checkpoint per job, not per round
    first = json.loads((root / "gdn" / "selection" / "rounds" / "round1.json").read_text())
    assert len(first["racing"]) == 2  # dropped at the first job's end (round 1), not at round 0
    assert first["history"][0]["racing_layers"] == 4
    for layer in range(4):
        swap = root / "gdn" / "swap" / f"layer{layer}"
        files = sorted(path.name for path in swap.glob("round*.json"))
        assert files == (["round1.json", "round3.json"] if layer in first["racing"] else ["round1.json"])
        for name in files:  # each job's rounds score as the run with a job per round scored them
            for snapshot in json.loads((swap / name).read_text())["snapshots"]:
                assert snapshot["step"] == snapshot["round"] + 1
                per_round = live_racing_run / "swap" / f"layer{layer}" / f"round{snapshot['round']}.json"
                if per_round.exists():  # that run trained this layer this far too
                    assert snapshot["heldout_kl"] == json.loads(per_round.read_text())["heldout_kl"]
    early_stop = json.loads((root / "gdn" / "selection" / "early_stop.json").read_text())
    assert [entry["round"] for entry in early_stop["rounds"]] == [0, 1, 2, 3]
    assert [entry["racing_layers"] for entry in early_stop["rounds"]] == [4, 2, 2, 2]
    assert early_stop["tokens_spent"] == (2 * 2 + 2 * 4) * 64 and early_stop["snapshots_per_job"] == 2


def test_without_the_live_rule_one_job_per_layer_scores_every_round_and_replays_the_race(
        tiny_teacher_dir, tmp_path, finished_run, live_racing_run):
    config = tiny_config(tiny_teacher_dir, **RACING, **{"scoring.early_stop.enabled": False})
    workdir = copy_of_run(finished_run, tmp_path, only=BEFORE_SCORING)
    result = run_snakemake(workdir, config, "results/tiny/gdn/selection/early_stop.json")
    assert result.returncode == 0, result.stderr[-5000:]
    root = tmp_path / "run" / "results" / "tiny"
    logs = sorted(path.name for path in (root / "logs" / "gdn" / "score_layer").iterdir())
    assert logs == [f"layer{layer}_all_rounds.log" for layer in range(4)]  # no job per round
    checks = sorted(path.name for path in (root / "logs" / "gdn" / "check_early_stop").iterdir())
    assert checks == ["all_rounds.log"]  # and no checkpoint per round: nothing is decided live
    decisions = [json.loads((root / "gdn" / "selection" / "rounds" / f"round{r}.json").read_text()) for r in range(4)]
    assert [d["stop"] for d in decisions] == [False, False, False, True]
    for layer in range(4):  # the reference run trains every layer in full, raced out or not
        swap = root / "gdn" / "swap" / f"layer{layer}"
        steps = [json.loads((swap / f"round{r}.json").read_text())["step"] for r in range(4)]
        assert steps == [1, 2, 3, 4]
        assert not (swap / "stage2" / "state").exists()
    # its decisions replay the live race exactly, so a replay of recorded scores stands for a live run
    for r, replayed in enumerate(decisions):
        live = json.loads((live_racing_run / "selection" / "rounds" / f"round{r}.json").read_text())
        assert {key: replayed[key] for key in ("racing", "top_k", "tokens", "mean_jaccard")} == \
            {key: live[key] for key in ("racing", "top_k", "tokens", "mean_jaccard")}
    early_stop = json.loads((root / "gdn" / "selection" / "early_stop.json").read_text())
    assert early_stop["stopped_at_round"] == 3 and not early_stop["enabled"]
    cost = early_stop["selection_cost"]
    assert cost["top_k_full_budget"] == decisions[3]["top_k_as_scored"]  # every layer's own last score
    assert cost["top_k_at_stop"] == early_stop["rounds"][cost["stop_round"]]["top_k"]
    assert cost["swaps_between"] == len(set(cost["top_k_full_budget"]) - set(cost["top_k_at_stop"]))
    assert early_stop["tokens_spent"] == 4 * 4 * 64 and cost["stage2_tokens_to_stop"] == (4 + 2 * 3) * 64


ALL_SELECTORS = ["ga_s2", "ga_s1", "gr_s1", "avg_s1", "gr_s2", "avg_s2", "uniform", "random", "act_mse", "lm_ppl",
                 "ar", "kv", "user", "ga_iter"]


def test_every_selector_produces_a_valid_layer_set(tiny_teacher_dir, finished_run, tmp_path):
    """On a copy of the finished run: the selectors it lacks need only their own signals and greedy steps."""
    config = tiny_config(tiny_teacher_dir, **{"selection.selectors": ALL_SELECTORS, "selection.user_layers": [0, 3]})
    names = [s if s != "random" else "random_seed0" for s in ALL_SELECTORS]
    targets = [f"results/tiny/gdn/selection/{name}_K2.json" for name in names]
    workdir = copy_of_run(finished_run, tmp_path)
    result = run_snakemake(workdir, config, *targets, "results/tiny/gdn/selection/ga_iter_K1.json")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert not re.search(r"^(local)?rule (prepare_data|distill_all_linear_stage[12]|score_layer):", result.stdout,
                         re.MULTILINE), "the finished run's training was redone"
    chosen = {}
    for name, target in zip(names, targets):
        layers = json.loads((tmp_path / "run" / target).read_text())["softmax_layers"]
        assert len(set(layers)) == 2 and all(0 <= i < 4 for i in layers), name
        chosen[name] = layers
    assert chosen["user"] == [0, 3]
    assert chosen["uniform"] == [1, 3]
    signals = json.loads((tmp_path / "run/results/tiny/signals/bypass.json").read_text())
    assert set(signals) == {"act_mse", "lm_ppl", "ar", "kv"} and all(len(v) == 4 for v in signals.values())
    check_greedy_steps(tmp_path / "run/results/tiny/gdn", chosen["ga_iter"], chosen["ga_s2"])


def check_greedy_steps(root: Path, ga_iter_k2: list[int], ga_s2_k2: list[int]) -> None:
    """GA-iter's sets are the greedy choice given the recorded scores; step 0 is GA-S2's final round."""
    final_round = json.loads((root / "selection/early_stop.json").read_text())["stopped_at_round"]
    swap = {layer: json.loads((root / f"swap/layer{layer}/round{final_round}.json").read_text()) for layer in range(4)}
    steps = [json.loads((root / f"selection/greedy/step{i}.json").read_text()) for i in (0, 1)]
    assert steps[0]["heldout_kl"] == {str(layer): score["heldout_kl"] for layer, score in swap.items()}
    assert steps[0]["train_steps"] == swap[0]["step"]
    scores = [{layer: score["heldout_kl"] for layer, score in swap.items()}, {}]
    first = steps[0]["chosen"][0]
    for layer in sorted(set(range(4)) - {first}):
        score = json.loads((root / f"greedy/step1/layer{layer}/score.json").read_text())
        assert score["softmax_layers"] == sorted([first, layer]) and score["step"] == steps[0]["train_steps"]
        assert not (root / f"greedy/step1/layer{layer}/stage2/state").exists()
        scores[1][layer] = score["heldout_kl"]
    assert steps[1]["heldout_kl"] == {str(layer): kl for layer, kl in scores[1].items()}
    picks = [min(step_scores, key=lambda layer: (step_scores[layer], layer)) for step_scores in scores]
    assert [step["chosen"] for step in steps] == [picks[:1], picks]
    assert json.loads((root / "selection/ga_iter_K1.json").read_text())["softmax_layers"] == picks[:1]
    assert ga_iter_k2 == sorted(picks)
    assert picks[0] in ga_s2_k2  # GA-S2's best layer is in its top 2
