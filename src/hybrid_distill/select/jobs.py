"""Selection jobs that run models: the bypass heuristics and the stage-1 signals (GA-S1, GR-S1)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from hybrid_distill.distill.atomic import write_json
from hybrid_distill.distill.jobs import EVAL_BATCH, open_data
from hybrid_distill.distill.objectives import HeldoutTeacher, heldout_kl
from hybrid_distill.models.checkpoint import load_hybrid
from hybrid_distill.models.student import decoder_layers, num_layers
from hybrid_distill.models.teacher import load_teacher
from hybrid_distill.select.bypass import act_mse_and_ppl_increase, task_drop
from hybrid_distill.select.score_files import signals_to_json


def score_bypass(config: dict, teacher_dir: Path, data_dir: Path, out_json: Path) -> None:
    """ACT-MSE, LM-PPL, AR and KV importances of the teacher's layers (bypass each, measure the loss)."""
    from hybrid_distill.evaluate.loading import resolve_device
    from hybrid_distill.evaluate.recall_tasks import generate_examples

    teacher, tokenizer = load_teacher(str(teacher_dir), device=resolve_device(None))
    count = config["selection"]["probe_sequences"]
    heldout = open_data(data_dir, "heldout")
    act_mse, ppl_increase = act_mse_and_ppl_increase(teacher, heldout.batch(0, min(count, heldout.num_sequences)))
    context = min(config["evaluate"]["context_lengths"])
    signals = {"act_mse": act_mse, "lm_ppl": ppl_increase}
    for name, task in (("ar", "associative_recall"), ("kv", "kv_retrieval")):
        examples = generate_examples(task, tokenizer, context, count, seed=config["seed"] + 17)
        signals[name] = task_drop(teacher, tokenizer, examples)
    write_json(out_json, signals_to_json(signals))


@contextmanager
def layer_mix(student, teacher, softmax_layers):
    """Temporarily give `student` the teacher's attention (shared, not copied) in `softmax_layers`."""
    layers = decoder_layers(student)
    saved = {i: layers[i].self_attn for i in softmax_layers}
    for i in softmax_layers:
        layers[i].self_attn = decoder_layers(teacher)[i].self_attn
    try:
        yield student
    finally:
        for i, module in saved.items():
            layers[i].self_attn = module


def score_stage1_signals(config: dict, teacher_dir: Path, data_dir: Path, stage1_dir: Path, out_json: Path) -> None:
    """GA-S1 (-KL of the stage-1 all-linear student with layer l restored) and GR-S1 (KL of the teacher with
    only layer l linear, stage-1 weights). Stage 1 is layer-local, so neither needs more training."""
    teacher, _ = load_teacher(str(teacher_dir))
    student = load_hybrid(stage1_dir)
    heldout = open_data(data_dir, "heldout")
    total = num_layers(teacher)
    kept_teacher = HeldoutTeacher()  # 2L + 1 scores against one teacher

    def kl(model):
        return heldout_kl(model, teacher, heldout, config["scoring"]["heldout_sequences"], EVAL_BATCH,
                          config["distill"]["temperature"], config["distill"]["kl_chunk_tokens"], kept_teacher)

    ga, gr = {}, {}
    for layer in range(total):
        with layer_mix(student, teacher, [layer]):
            ga[layer] = -kl(student)
        with layer_mix(student, teacher, [i for i in range(total) if i != layer]):
            gr[layer] = kl(student)
    write_json(out_json, signals_to_json({"ga_s1": ga, "gr_s1": gr}))
