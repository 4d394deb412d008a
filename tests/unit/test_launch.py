"""How training jobs are launched: the command `train_command` builds, and CPU threads split among processes."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from snakemake.exceptions import WorkflowError
from snakemake.iocontainers import ResourceList

from hybrid_distill import cli

REPO = Path(__file__).resolve().parents[2]
FSDP_CONFIG = REPO / "profiles" / "slurm" / "accelerate-fsdp.yaml"


def load_train_command():
    """`train_command` as rules/common.smk defines it (the file is Snakemake syntax, so only the function is run)."""
    source = (REPO / "rules" / "common.smk").read_text()
    match = re.search(r"^def train_command\(.*?(?=^\S)", source, flags=re.MULTILINE | re.DOTALL)
    assert match, "rules/common.smk defines no train_command"
    namespace = {"os": os, "WorkflowError": WorkflowError}
    exec(compile(match.group(0), "rules/common.smk", "exec"), namespace)
    return namespace["train_command"]


def resources(**values) -> ResourceList:
    """What Snakemake passes a params function as `resources`."""
    return ResourceList(fromdict=values)


@pytest.mark.parametrize("threads, processes, expected", [
    (32, 1, 32), (32, 4, 8), (32, 3, 10), (8, 8, 1), (2, 4, 1), (1, 1, 1), (5, 0, 5),
])
def test_threads_per_process(threads, processes, expected):
    assert cli.threads_per_process(threads, processes) == expected


STAGE1_ARGS = ["distill-stage1", "--config", "c.yaml", "--teacher", "t", "--data", "d", "--mixer", "gdn", "--out", "o"]


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("environment, expected", [
    ({"LOCAL_WORLD_SIZE": "4"}, 2),  # `accelerate launch --num_processes 4`: each process takes a quarter
    ({}, 8),  # plain python, or a one-process launch
])
def test_the_cli_splits_its_threads_among_the_launched_processes(
        environment, expected, monkeypatch, restore_torch_threads):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    seen = []
    monkeypatch.setattr(cli, "step_distill_stage1", lambda args: seen.append(torch.get_num_threads()))
    assert cli.main(["--threads", "8", *STAGE1_ARGS]) == 0
    assert seen == [expected]


def test_slurm_cpus_are_split_when_no_threads_are_given(monkeypatch, restore_torch_threads):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    seen = []
    monkeypatch.setattr(cli, "step_distill_stage1", lambda args: seen.append(torch.get_num_threads()))
    assert cli.main(STAGE1_ARGS) == 0
    assert seen == [3]


def test_train_command_on_cpu_and_on_gpus():
    train_command = load_train_command()
    assert train_command(resources(gpu=0)) == "python -m hybrid_distill.cli"
    assert train_command(resources(gpu=4)) == "accelerate launch --num_processes 4 -m hybrid_distill.cli"


def test_train_command_carries_an_accelerate_config_file():
    train_command = load_train_command()
    command = train_command(resources(gpu=4, accelerate_config=str(FSDP_CONFIG)))
    assert command == f"accelerate launch --num_processes 4 --config_file {FSDP_CONFIG} -m hybrid_distill.cli"
    # CPU jobs run plain python: there is no launcher to give the file to.
    assert train_command(resources(gpu=0, accelerate_config=str(FSDP_CONFIG))) == "python -m hybrid_distill.cli"


def test_train_command_quotes_the_path_and_refuses_a_missing_file(tmp_path):
    train_command = load_train_command()
    spaced = tmp_path / "my configs" / "fsdp.yaml"
    spaced.parent.mkdir()
    spaced.write_text("distributed_type: FSDP\n")
    assert f"--config_file '{spaced}' -m" in train_command(resources(gpu=2, accelerate_config=str(spaced)))
    with pytest.raises(WorkflowError, match="accelerate_config=.*nowhere.yaml: no such file"):
        train_command(resources(gpu=2, accelerate_config=str(tmp_path / "nowhere.yaml")))


def test_the_example_fsdp_file_is_valid_for_accelerate_launch():
    """Parsed as `accelerate launch --config_file` does, and turned into the FSDP plugin the processes build."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    assert load_config_from_file(str(FSDP_CONFIG)).distributed_type == "FSDP"
    launch_options = {action.dest for action in launch_command_parser()._actions}
    unknown = set(load_config_from_file(str(FSDP_CONFIG)).fsdp_config) - launch_options
    assert not unknown, f"keys accelerate launch does not know: {unknown}"

    argv = ["--config_file", str(FSDP_CONFIG), "--num_processes", "4", "-m", "hybrid_distill.cli", "distill-stage1"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert args.use_fsdp and args.num_processes == 4  # the rule's process count wins over the file
    environment = prepare_multi_gpu_env(args)
    fsdp_environment = {name: value for name, value in environment.items() if "FSDP" in name}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in fsdp_environment.items():
            patch.setenv(name, value)
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT" and plugin.cpu_ram_efficient_loading
