"""GA-iter jobs: one greedy step's choice from its candidates' score files, and reading a step's choice back."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from hybrid_distill.distill.atomic import drop_training_state, write_json
from hybrid_distill.select.greedy import greedy_step
from hybrid_distill.select.score_files import ScoreFileError, read_score

log = logging.getLogger(__name__)


def read_greedy_choice(path: Path) -> dict:
    """A greedy step's file: `chosen` (pick order so far), `train_steps`, the step's `heldout_kl` per candidate."""
    try:
        payload = json.loads(Path(path).read_text())
        payload["chosen"] = [int(layer) for layer in payload["chosen"]]
        payload["train_steps"] = int(payload["train_steps"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ScoreFileError(f"greedy step file {path} is corrupt or incomplete ({type(error).__name__}: {error})") \
            from None
    return payload


def _candidate_score(path: Path) -> tuple[float, int, list[int]]:
    """(held-out KL, steps trained, softmax layers) of one scoring job."""
    payload = read_score(path)
    try:
        return float(payload["heldout_kl"]), int(payload["step"]), sorted(int(i) for i in payload["softmax_layers"])
    except (KeyError, TypeError, ValueError) as error:
        raise ScoreFileError(f"score file {path} is corrupt or incomplete ({type(error).__name__}: {error})") from None


def choose_greedy_layer(step: int, num_layers: int, candidates: list[int], score_files: list[Path], out_json: Path,
                        previous_file: Path | None = None, drop_states: bool = False) -> dict:
    """Greedy step `step`: add the best candidate to the previous step's pick order and write it.

    Step 0 has nothing chosen, so its jobs are exactly GA-S2's one-swap jobs: it reads their final-round scores
    (no recomputation) and records the most steps they trained (`train_steps`: layers raced out by
    scoring.racing stopped sooner and keep their last score); every later step's jobs train
    that many, so all steps score on the same budget. `drop_states` deletes the scoring jobs' training states.
    """
    if len(candidates) != len(score_files):
        raise ValueError(f"greedy step {step}: {len(candidates)} candidate layers but {len(score_files)} score files")
    if (previous_file is None) != (step == 0):
        raise ValueError(f"greedy step {step}: a previous step file is needed exactly when the step is not 0")
    previous = read_greedy_choice(previous_file) if previous_file is not None else None
    chosen = previous["chosen"] if previous else []
    if len(chosen) != step:
        raise ScoreFileError(f"greedy step file {previous_file} lists {len(chosen)} picks, step {step - 1} "
                             f"should have made {step}")
    scores = {layer: _candidate_score(path) for layer, path in zip(candidates, score_files)}
    # step 0's scores are GA-S2's: with scoring.racing, raced-out layers stopped early and keep their last score
    train_steps = previous["train_steps"] if previous else max(trained for _, trained, _ in scores.values())
    heldout_kl = {}
    for (layer, (kl, trained, softmax_layers)), path in zip(scores.items(), score_files):
        expected = sorted([*chosen, layer])
        if softmax_layers != expected:
            raise ScoreFileError(f"score file {path} scores softmax layers {softmax_layers}, greedy step {step} "
                                 f"expects {expected}")
        if trained != train_steps and previous:
            raise ScoreFileError(f"score file {path} trained {trained} steps, greedy step {step} expects {train_steps}")
        heldout_kl[layer] = kl
    pick_order = greedy_step(chosen, heldout_kl, num_layers)
    payload = {"step": step, "picked": pick_order[-1], "chosen": pick_order, "train_steps": train_steps,
               "heldout_kl": {str(layer): kl for layer, kl in sorted(heldout_kl.items())}}
    write_json(out_json, payload)
    log.info("greedy step %d: picked layer %d (held-out KL %.6g); pick order %s", step, pick_order[-1],
             heldout_kl[pick_order[-1]], pick_order)
    if drop_states:
        for path in score_files:
            drop_training_state(Path(path).parent / "stage2")
    return payload
