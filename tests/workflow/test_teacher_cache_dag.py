"""Planning with distill.teacher_cache: one cache job that every stage-2 job reads when on, none when off."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_workflow import job_counts
from workflow_helpers import REPO, bare_env

pytestmark = pytest.mark.workflow

STAGE2_RULES = ("distill_all_linear_stage2", "score_layer", "score_removal", "distill_hybrid")
CACHE = "teacher_cache/train_hidden.bin"


def dry_run(tmp_path: Path, teacher_cache: dict | None) -> str:
    config = yaml.safe_load((REPO / "configs" / "paper-qwen2.5-3b.yaml").read_text())
    if teacher_cache is not None:
        config["distill"].update(teacher_cache=teacher_cache)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
               "--configfile", str(tmp_path / "config.yaml"), "-n", "-p", "--cores", "8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=bare_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def planned_jobs(output: str) -> list[tuple[str, str]]:
    """(rule, the job's block of the dry-run listing: inputs and shell command)."""
    blocks = re.split(r"\n(?=\[[^\]]+\]\n(?:rule|localrule|checkpoint) )", output)
    jobs = []
    for block in blocks:
        match = re.search(r"^(?:rule|localrule|checkpoint) (\w+):", block, re.MULTILINE)
        if match:
            jobs.append((match.group(1), block))
    return jobs


def test_cache_on_plans_one_cache_job_that_every_stage2_job_reads(tmp_path):
    output = dry_run(tmp_path, {"enabled": True, "max_gb": 2})
    assert job_counts(output)["cache_teacher_hidden"] == 1
    stage2_jobs = [block for rule, block in planned_jobs(output) if rule in STAGE2_RULES]
    assert {rule for rule, _ in planned_jobs(output) if rule in STAGE2_RULES} == set(STAGE2_RULES)
    for block in stage2_jobs:
        inputs = next(line for line in block.splitlines() if line.strip().startswith("input:"))
        assert CACHE in inputs and f"--teacher-cache results/paper-qwen2.5-3b/{CACHE}" in block, block


def test_cache_off_by_default_plans_no_cache_job(tmp_path):
    output = dry_run(tmp_path, None)
    assert "cache_teacher_hidden" not in job_counts(output)
    assert "--teacher-cache" not in output and CACHE not in output
