"""Recall tasks built with the real SmolLM2 tokenizer, and run through lm-eval on a tiny random Llama."""
import json
import re
from collections import Counter

import lm_eval
import pytest
from tiny_models import tiny_teacher
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from hybrid_distill.evaluate.recall_lm_eval import GROUP_NAME, build_task_dir, lm_eval_task_name
from hybrid_distill.evaluate.recall_tasks import (
    TASKS, build_example, count_tokens, generate_examples, score_all, write_task_files,
)

pytestmark = pytest.mark.integration

HELD_OUT = [
    "The committee met on Tuesday to discuss the harbour budget. Several members raised concerns "
    "about dredging costs, and the chair promised a written report.\nNothing was decided.",
    "Photosynthesis converts light into chemical energy; chlorophyll absorbs mostly red and blue light.",
]
SLACK = {"kv_retrieval": 32}  # one JSON pair is ~25 tokens; every other unit is under 10


def context_and_question(example):
    context, _, question = example["input"].rpartition("Question:")
    assert context and question.rstrip().splitlines()[-1].startswith("Answer:")
    return context, question


def check_answer_is_in_the_text(example):
    """Recompute the answer from the input text alone and compare it with `outputs`."""
    task, outputs = example["task"], example["outputs"]
    context, question = context_and_question(example)
    if task.startswith("niah"):
        pairs = re.findall(r"The secret code of ([a-z]+-[a-z]+) is (\d{7})\.", context)
        codes = {}
        for key, value in pairs:
            codes.setdefault(key, []).append(value)
        asked = re.findall(r"[a-z]+-[a-z]+", question.split("\n")[0])
        assert len(pairs) == {"niah_single": 1}.get(task, 4)
        assert sorted(v for key in asked for v in codes[key]) == sorted(outputs)
        if task == "niah_multikey":
            assert len(codes) == 4 and len(asked) == 1
    elif task == "variable_tracking":
        value = re.search(r"hold the value (\d+)", question).group(1)
        held = {}
        for name, source in re.findall(r"VAR ([A-Z]{5}) = (\d+|VAR [A-Z]{5})\.", context):
            held[name] = held[source[4:]] if source.startswith("VAR ") else source  # KeyError if out of order
        assert len(held) == 10
        assert sorted(n for n, v in held.items() if v == value) == sorted(outputs)
    elif task == "common_words":
        entries = re.findall(r"^(\d+)\. (\w+)$", context, flags=re.MULTILINE)
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(word for _, word in entries)
        assert min(counts[w] for w in outputs) > max(c for w, c in counts.items() if w not in outputs)
    elif task == "kv_retrieval":
        mapping = json.loads(context[context.index("{"):context.rindex("}") + 1])
        key = re.search(r'key "([0-9a-f-]+)"', question).group(1)
        assert context.count(key) == 1 and mapping[key] == outputs[0]
    elif task == "associative_recall":
        pairs = re.findall(r"^(\S+) (\d+)$", context, flags=re.MULTILINE)
        mapping = dict(pairs)
        assert len(mapping) == len(pairs)
        assert mapping[re.search(r"paired with (\S+)\?", question).group(1)] == outputs[0]
    else:
        raise AssertionError(f"no check for {task}")


@pytest.mark.parametrize("task", TASKS)
def test_examples_fill_the_budget_and_hold_their_answer(smollm2_tokenizer, task):
    for context_length in (256, 700):
        for haystack in (None, HELD_OUT):
            examples = generate_examples(task, smollm2_tokenizer, context_length, 2, seed=3, haystack_texts=haystack)
            assert len(examples) == 2 and examples[0]["input"] != examples[1]["input"]
            for example in examples:
                assert set(example) == {"input", "outputs", "task", "length", "seed"}
                assert example["length"] == count_tokens(smollm2_tokenizer, example["input"])
                assert context_length - SLACK.get(task, 10) <= example["length"] <= context_length
                check_answer_is_in_the_text(example)
                assert build_example(task, smollm2_tokenizer, context_length, example["seed"], haystack) == example


@pytest.mark.parametrize("task", ["niah_multikey", "variable_tracking"])
def test_haystack_texts_replace_the_filler(smollm2_tokenizer, task):
    filler = generate_examples(task, smollm2_tokenizer, 512, 1, seed=0)[0]["input"]
    held_out = generate_examples(task, smollm2_tokenizer, 512, 1, seed=0, haystack_texts=HELD_OUT)[0]["input"]
    assert "Rivers run down to the sea." in filler and "dredging" not in filler
    assert "dredging" in held_out and "chlorophyll" in held_out and "Rivers run down" not in held_out


def test_same_seed_same_files_other_seed_other_files(smollm2_tokenizer, tmp_path):
    lengths = [256, 300]
    first = write_task_files(tmp_path / "a", smollm2_tokenizer, TASKS, lengths, 2, seed=0)
    again = write_task_files(tmp_path / "b", smollm2_tokenizer, TASKS, lengths, 2, seed=0)
    other = write_task_files(tmp_path / "c", smollm2_tokenizer, TASKS, lengths, 2, seed=1)
    expected_names = sorted(f"{t}_{n}.jsonl" for t in TASKS for n in lengths)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == expected_names  # no temporary files left
    for a, b, c in zip(first, again, other):
        assert a.read_bytes() == b.read_bytes()
        assert a.read_bytes() != c.read_bytes()
        rows = [json.loads(line) for line in a.read_text().splitlines()]
        assert len(rows) == 2 and all(row["length"] <= int(a.stem.rsplit("_", 1)[1]) for row in rows)
    assert len({p.read_bytes() for p in first}) == len(first)  # no two (task, length) files alike


def test_user_errors_name_the_problem(smollm2_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="variable_tracking: context_length 64 is too short"):
        generate_examples("variable_tracking", smollm2_tokenizer, 64, 1, seed=0)
    with pytest.raises(ValueError, match="unknown recall task 'niah_double'"):
        write_task_files(tmp_path, smollm2_tokenizer, ["niah_double"], [256], 1, seed=0)
    with pytest.raises(FileNotFoundError, match="niah_single_256.jsonl"):
        build_task_dir(tmp_path, tmp_path / "tasks", ["niah_single"], [256])


def run_lm_eval(model, task_dir, **kwargs):
    task_manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, tasks=[GROUP_NAME], task_manager=task_manager, **kwargs)


def test_lm_eval_hf_model_scores_the_recall_group(smollm2_tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    tiny_teacher("llama", vocab_size=len(smollm2_tokenizer)).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    tasks = ["niah_single", "common_words"]
    write_task_files(tmp_path / "data", smollm2_tokenizer, tasks, [128], 2, seed=0)
    task_dir = build_task_dir(tmp_path / "data", tmp_path / "tasks", tasks, [128], datasets_cache_dir=tmp_path / "hf")

    output = run_lm_eval("hf", task_dir, model_args={"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"},
                         batch_size=1)
    results = output["results"]
    assert 0.0 <= results[GROUP_NAME]["string_match_all,none"] <= 1.0
    for task in tasks:
        name = lm_eval_task_name(task, 128)
        file_rows = [json.loads(line) for line in (tmp_path / "data" / f"{task}_128.jsonl").read_text().splitlines()]
        samples = output["samples"][name]
        assert [s["target"] for s in samples] == [row["outputs"] for row in file_rows]
        expected = sum(score_all(s["filtered_resps"][0], s["target"]) for s in samples) / len(samples)
        assert results[name]["string_match_all,none"] == pytest.approx(expected)


class OracleLM(LM):
    """An lm-eval model that answers from the document itself: all outputs, or only the first."""

    def __init__(self, first_only: bool):
        super().__init__()
        self.first_only = first_only

    def generate_until(self, requests):
        return [" " + ", ".join(r.doc["outputs"][:1] if self.first_only else r.doc["outputs"]) for r in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def test_lm_eval_scores_known_answers(smollm2_tokenizer, tmp_path):
    tasks = ["niah_single", "niah_multivalue", "variable_tracking"]
    write_task_files(tmp_path / "data", smollm2_tokenizer, tasks, [256], 2, seed=0)
    task_dir = build_task_dir(tmp_path / "data", tmp_path / "tasks", tasks, [256], datasets_cache_dir=tmp_path / "hf")

    perfect = run_lm_eval(OracleLM(first_only=False), task_dir)["results"]
    assert perfect[GROUP_NAME]["string_match_all,none"] == 1.0
    partial = run_lm_eval(OracleLM(first_only=True), task_dir)["results"]
    assert partial[lm_eval_task_name("niah_single", 256)]["string_match_all,none"] == 1.0
    assert partial[lm_eval_task_name("niah_multivalue", 256)]["string_match_all,none"] == 0.25
    assert partial[lm_eval_task_name("variable_tracking", 256)]["string_match_all,none"] == 0.2
    assert partial[lm_eval_task_name("niah_multivalue", 256)]["string_match_part,none"] == 1.0
    assert partial[GROUP_NAME]["string_match_all,none"] == pytest.approx((1.0 + 0.25 + 0.2) / 3)
