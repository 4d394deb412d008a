"""Offline recall tasks in the spirit of RULER, built to a token budget with a given tokenizer.

Each example is {"input", "outputs", "task", "length", "seed"}: `input` ends with a question and an
answer prefix so that a base model completes it; `length` counts input tokens as the tokenizer
encodes them by default (special tokens included, as lm-eval's hf model feeds them) and never exceeds
the context length; `seed` rebuilds that one example through build_example. The same files serve the
evaluation (through lm-eval) and the task-guided layer selectors.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FILLER_SENTENCES = (
    "Rivers run down to the sea.", "Clouds drift slowly over the quiet hills.",
    "A farmer walks along the dusty road.", "The bread in the oven is warm.",
    "Birds sing at the edge of the field.", "The old clock in the hall ticks on.",
    "Leaves fall softly in the autumn wind.", "A small boat rests by the shore.",
)
ADJECTIVES = (
    "amber brave calm dusty eager faint gentle hollow icy jolly keen lunar misty noble odd pale quiet "
    "rapid silver tidy upper vivid wild young zesty bold crimson dark early frosty golden humble"
).split()
NOUNS = (
    "anchor badger candle dragon engine falcon garden harbor island jacket kettle lantern meadow needle "
    "orchard pepper quarry rabbit saddle tunnel umbrella valley walnut yacht zebra bridge castle desert "
    "forest glacier hammer insect jungle kitten ladder mirror"
).split()
_CONSONANTS = "bdfghklmnprstvwz"
_VOWELS = "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]  # 80 syllables -> 512,000 three-syllable words

NIAH_KEYS = 4          # keys in multikey / multiquery, values in multivalue
VT_HOPS = 4            # each chain: one value assignment, then VT_HOPS copies
VT_CHAINS = 2          # one asked chain plus distractor chains
CWE_TOP_N = 5          # words asked for
CWE_COMMON_SHARE = 0.4  # fraction of list entries taken by the common words


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of `text` as the tokenizer encodes it by default (with its special tokens)."""
    return len(tokenizer(text)["input_ids"])


def score_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of references found in the prediction, case-insensitive (RULER's string_match_all, per example)."""
    if not references:
        raise ValueError("score_all needs at least one reference")
    lowered = prediction.lower()
    return sum(ref.lower() in lowered for ref in references) / len(references)


def score_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any reference is found in the prediction, case-insensitive (RULER's string_match_part)."""
    if not references:
        raise ValueError("score_part needs at least one reference")
    lowered = prediction.lower()
    return float(any(ref.lower() in lowered for ref in references))


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over examples of score_all."""
    return float(np.mean([score_all(p, r) for p, r in zip(predictions, references, strict=True)]))


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over examples of score_part."""
    return float(np.mean([score_part(p, r) for p, r in zip(predictions, references, strict=True)]))


# ---------------------------------------------------------------- haystack and budget fitting

def _haystack_words(haystack_texts: Sequence[str] | None) -> list[str] | None:
    if haystack_texts is None:
        return None
    words = re.findall(r"\S+\s*", "\n\n".join(haystack_texts))
    if not words:
        raise ValueError("haystack_texts holds no words")
    return [w if w[-1].isspace() else w + " " for w in words]


class _Haystack:
    """Filler units (sentences, or words of the given texts) cycled from an offset, with needles inserted."""

    def __init__(self, words: list[str] | None, rng: np.random.Generator):
        self.units = [s + " " for s in FILLER_SENTENCES] if words is None else words
        self.offset = int(rng.integers(len(self.units)))

    def render(self, n: int, needles: Sequence[tuple[float, str]]) -> str:
        slots: dict[int, list[str]] = {}
        for depth, text in needles:  # depth in [0, 1]: where the needle sits among the n units
            slots.setdefault(int(round(depth * n)), []).append(text + " ")
        pieces = []
        for i in range(n + 1):
            pieces.extend(slots.get(i, ()))
            if i < n:
                pieces.append(self.units[(self.offset + i) % len(self.units)])
        return "".join(pieces).strip()


def _fit(tokenizer, budget: int, render: Callable[[int], str], min_units: int, max_units: int, task: str):
    """Largest unit count whose rendered input fits the budget; returns (input, token count).

    Tokens grow about linearly with units, so the search interpolates (and bisects once the same
    bound has moved twice in a row); counts are measured, never assumed, so the budget always holds.
    """
    low, low_tokens = min_units, count_tokens(tokenizer, render(min_units))
    if low_tokens > budget:
        raise ValueError(
            f"{task}: context_length {budget} is too short; the smallest input needs {low_tokens} tokens")
    high, high_tokens = max_units + 1, None  # the smallest count known to overflow (or one past the cap)
    per_unit = None
    last_fit, same_bound_moves = None, 0
    while high - low > 1:
        if per_unit is None:
            probe = low + 64
        elif high_tokens is None:
            probe = low + int(1.02 * (budget - low_tokens) / per_unit) + 2
        elif same_bound_moves >= 2:
            probe = (low + high) // 2
        else:
            probe = low + int((budget - low_tokens) * (high - low) / (high_tokens - low_tokens))
        probe = min(max(probe, low + 1), high - 1)
        probe_tokens = count_tokens(tokenizer, render(probe))
        per_unit = max((probe_tokens - low_tokens) / (probe - low), 1e-3)
        fits = probe_tokens <= budget
        same_bound_moves = same_bound_moves + 1 if fits == last_fit else 1
        last_fit = fits
        if fits:
            low, low_tokens = probe, probe_tokens
        else:
            high, high_tokens = probe, probe_tokens
    return render(low), low_tokens


def _distinct(draw: Callable[[int], list[str]], count: int) -> list[str]:
    """Draw until `count` distinct items exist (draws are large relative to count, so this loops rarely)."""
    seen: dict[str, None] = {}
    while len(seen) < count:
        for item in draw(count):
            seen.setdefault(item, None)
    return list(seen)[:count]


def _nonce_words(rng: np.random.Generator, count: int) -> list[str]:
    """Distinct pronounceable six-letter words (equal length, so none is a substring of another)."""
    total = len(_SYLLABLES) ** 3
    if count > total:
        raise ValueError(f"cannot draw {count} distinct nonce words (at most {total})")
    codes = rng.choice(total, size=count, replace=False)
    n = len(_SYLLABLES)
    return [_SYLLABLES[c // (n * n)] + _SYLLABLES[(c // n) % n] + _SYLLABLES[c % n] for c in codes.tolist()]


def _numbers(rng: np.random.Generator, digits: int, count: int) -> list[str]:
    return _distinct(lambda c: [str(v) for v in rng.integers(10 ** (digits - 1), 10 ** digits, size=c)], count)


# ---------------------------------------------------------------- task layouts
# Each layout returns (render(n) -> full input, outputs, min_units, max_units) for one example.

def _needles_layout(rng, words, budget, num_keys, values_per_key, num_queries):
    keys = _distinct(lambda c: [f"{a}-{b}" for a, b in zip(rng.choice(ADJECTIVES, c), rng.choice(NOUNS, c))],
                     num_keys)
    values = _numbers(rng, 7, num_keys * values_per_key)
    needles = []
    for i, key in enumerate(keys):
        for value in values[i * values_per_key:(i + 1) * values_per_key]:
            needles.append((float(rng.random()), f"The secret code of {key} is {value}."))
    asked = keys[:num_queries]
    outputs = values[:num_queries * values_per_key]
    if values_per_key > 1:
        question = f"Question: What are all the secret codes of {asked[0]}?\nAnswer: The secret codes of {asked[0]} are"
    elif num_queries > 1:
        names = ", ".join(asked[:-1]) + f" and {asked[-1]}"
        question = f"Question: What are the secret codes of {names}?\nAnswer: The secret codes are"
    else:
        question = f"Question: What is the secret code of {asked[0]}?\nAnswer: The secret code of {asked[0]} is"
    header = "Remember the secret codes hidden in the text below.\n\n"
    haystack = _Haystack(words, rng)
    return (lambda n: header + haystack.render(n, needles) + "\n\n" + question), outputs, 0, budget


def _variable_tracking_layout(rng, words, budget):
    names = _distinct(lambda c: ["".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), 5)) for _ in range(c)],
                      VT_CHAINS * (VT_HOPS + 1))
    values = _numbers(rng, 5, VT_CHAINS)
    needles = []
    for chain in range(VT_CHAINS):
        chain_names = names[chain * (VT_HOPS + 1):(chain + 1) * (VT_HOPS + 1)]
        depths = np.sort(rng.random(VT_HOPS + 1))  # assignments appear in the order they chain
        needles.append((float(depths[0]), f"VAR {chain_names[0]} = {values[chain]}."))
        for hop in range(1, VT_HOPS + 1):
            needles.append((float(depths[hop]), f"VAR {chain_names[hop]} = VAR {chain_names[hop - 1]}."))
    header = "Variable assignments are hidden in the text below. Keep track of them.\n\n"
    question = (f"Question: Which variables hold the value {values[0]}, directly or through other variables?\n"
                f"Answer: The variables that hold {values[0]} are")
    haystack = _Haystack(words, rng)
    outputs = names[:VT_HOPS + 1]
    return (lambda n: header + haystack.render(n, needles) + "\n\n" + question), outputs, 0, budget


def _common_words_layout(rng, words, budget):
    pool = _nonce_words(rng, min(budget + CWE_TOP_N, len(_SYLLABLES) ** 3))
    common, rare = pool[:CWE_TOP_N], pool[CWE_TOP_N:]
    shuffle_seed = int(rng.integers(2 ** 32))

    def render(n: int) -> str:
        common_count = max(2, int(n * CWE_COMMON_SHARE) // CWE_TOP_N)
        rare_count = max(1, min(3, common_count // 3))  # always fewer than common_count
        entries = [w for w in common for _ in range(common_count)]
        rare_needed = -(-max(0, n - len(entries)) // rare_count)
        entries += [w for w in rare[:rare_needed] for _ in range(rare_count)]
        entries = entries[:n]
        order = np.random.default_rng(shuffle_seed).permutation(len(entries))
        listing = "".join(f"{i + 1}. {entries[j]}\n" for i, j in enumerate(order))
        return ("Below is a numbered list of words. Some words occur far more often than others.\n\n" + listing
                + f"\nQuestion: What are the {CWE_TOP_N} most common words in the list above?\n"
                f"Answer: The {CWE_TOP_N} most common words are")

    return render, common, 2 * CWE_TOP_N, len(pool) - CWE_TOP_N


def _kv_retrieval_layout(rng, words, budget):
    def uuid_ish(c):
        return [f"{v:012x}"[:8] + "-" + f"{v:012x}"[8:] for v in rng.integers(0, 16 ** 12, size=c, dtype=np.int64)]

    max_pairs = max(1, budget // 4)  # a pair is never below 4 tokens, so this never binds early
    keys = _distinct(uuid_ish, max_pairs)
    values = uuid_ish(max_pairs)
    depth = float(rng.random())

    def render(n: int) -> str:
        target = int(round(depth * (n - 1)))  # the asked pair sits at this position among n pairs
        order = list(range(1, n))
        order.insert(target, 0)
        body = ",\n ".join(f'"{keys[i]}": "{values[i]}"' for i in order)
        return ("Below is a JSON object. Find the value stored under the requested key.\n\n{" + body + "}\n\n"
                f'Question: What is the value of the key "{keys[0]}"?\nAnswer: The value is')

    return render, [values[0]], 1, max_pairs


def _associative_recall_layout(rng, words, budget):
    max_pairs = max(1, budget // 2)
    named = list(rng.permutation(sorted(set(ADJECTIVES + NOUNS))))
    keys = named + [w for w in _nonce_words(rng, max(0, max_pairs - len(named)))]
    keys = keys[:max_pairs]
    values = [str(v) for v in rng.integers(10, 100, size=max_pairs)]
    depth = float(rng.random())

    def render(n: int) -> str:
        target = int(round(depth * (n - 1)))
        order = list(range(1, n))
        order.insert(target, 0)
        pairs = "".join(f"{keys[i]} {values[i]}\n" for i in order)
        return ("Each word below is paired with a number. Remember the pairs.\n\n" + pairs
                + f"\nQuestion: Which number is paired with {keys[0]}?\nAnswer: The number is")

    return render, [values[0]], 1, max_pairs


LAYOUTS: dict[str, Callable] = {
    "niah_single": partial(_needles_layout, num_keys=1, values_per_key=1, num_queries=1),
    "niah_multikey": partial(_needles_layout, num_keys=NIAH_KEYS, values_per_key=1, num_queries=1),
    "niah_multivalue": partial(_needles_layout, num_keys=1, values_per_key=NIAH_KEYS, num_queries=1),
    "niah_multiquery": partial(_needles_layout, num_keys=NIAH_KEYS, values_per_key=1, num_queries=NIAH_KEYS),
    "variable_tracking": _variable_tracking_layout,
    "common_words": _common_words_layout,
    "kv_retrieval": _kv_retrieval_layout,
    "associative_recall": _associative_recall_layout,
}
TASKS = tuple(LAYOUTS)
HAYSTACK_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking")


def check_task(task: str) -> None:
    """Raise one clear error for a task name this module cannot generate."""
    if task not in LAYOUTS:
        raise ValueError(f"unknown recall task {task!r}; known tasks: {', '.join(TASKS)}")


def _build(task, tokenizer, context_length, example_seed, words) -> dict:
    rng = np.random.default_rng(example_seed)
    render, outputs, min_units, max_units = LAYOUTS[task](rng, words, context_length)
    text, length = _fit(tokenizer, context_length, render, min_units, max_units, task)
    return {"input": text, "outputs": list(outputs), "task": task, "length": length, "seed": int(example_seed)}


def build_example(task: str, tokenizer, context_length: int, example_seed: int,
                  haystack_texts: Sequence[str] | None = None) -> dict:
    """One example from its own seed (the `seed` field of a generated example)."""
    check_task(task)
    return _build(task, tokenizer, context_length, example_seed, _haystack_words(haystack_texts))


def generate_examples(task: str, tokenizer, context_length: int, num_examples: int, seed: int,
                      haystack_texts: Sequence[str] | None = None) -> list[dict]:
    """Examples of one task; seeds differ per task and length, so files never share examples.

    haystack_texts replace the filler sentences in the needle and variable-tracking tasks; the list
    tasks (common_words, kv_retrieval, associative_recall) are their own haystack and ignore them.
    """
    check_task(task)
    if context_length < 1 or num_examples < 1:
        raise ValueError(
            f"{task}: context_length and num_examples must be positive, got {context_length}, {num_examples}")
    words = _haystack_words(haystack_texts) if task in HAYSTACK_TASKS else None
    sequence = np.random.SeedSequence([seed, zlib.crc32(task.encode()), context_length])
    return [_build(task, tokenizer, context_length, int(s), words) for s in sequence.generate_state(num_examples)]


def _generator(task: str) -> Callable[..., list[dict]]:
    def generate(tokenizer, context_length, num_examples, seed, haystack_texts=None):
        return generate_examples(task, tokenizer, context_length, num_examples, seed, haystack_texts)

    generate.__name__ = task
    generate.__doc__ = f"Examples of the {task} task (see generate_examples)."
    return generate


niah_single = _generator("niah_single")
niah_multikey = _generator("niah_multikey")
niah_multivalue = _generator("niah_multivalue")
niah_multiquery = _generator("niah_multiquery")
variable_tracking = _generator("variable_tracking")
common_words = _generator("common_words")
kv_retrieval = _generator("kv_retrieval")
associative_recall = _generator("associative_recall")


def task_file_name(task: str, context_length: int) -> str:
    return f"{task}_{context_length}.jsonl"


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and os.replace, so readers never see half a file."""
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                         delete=False, encoding="utf-8")
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def write_task_files(out_dir, tokenizer, tasks: Sequence[str], context_lengths: Sequence[int],
                     num_examples: int, seed: int, haystack_texts: Sequence[str] | None = None) -> list[Path]:
    """One JSONL per (task, length) at out_dir/{task}_{length}.jsonl, each written atomically."""
    for task in tasks:
        check_task(task)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in tasks:
        for context_length in context_lengths:
            examples = generate_examples(task, tokenizer, context_length, num_examples, seed, haystack_texts)
            path = out_dir / task_file_name(task, context_length)
            write_text_atomic(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))
            log.info("wrote %d %s examples of %d tokens to %s", len(examples), task, context_length, path)
            paths.append(path)
    return paths
