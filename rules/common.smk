# Config validation, the run's derived constants, and every path of the workflow (spelled only here).
import json
import math
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from hybrid_distill.config.load import SCHEMA_PATH, ConfigError, validate_config
from hybrid_distill.config.reads import SLICES, slice_file_content
from hybrid_distill.kernel_cache import export_kernel_cache
from hybrid_distill.models.teacher import TeacherError, describe_teacher
from hybrid_distill.select.budget import early_stop_k, job_ends, scoring_rounds, tokens_per_step
from hybrid_distill.select.greedy_jobs import read_greedy_choice
from hybrid_distill.select.score_files import ScoreFileError
from hybrid_distill.select.layer_sets import k_from_ratio, validate_layer_list


def _validated(raw):
    """Snakemake's validate fills the schema defaults; failures are re-worded as one line naming the key."""
    try:
        validate(raw, str(SCHEMA_PATH), set_default=True)
    except WorkflowError:
        pass
    try:
        return validate_config(raw)
    except ConfigError as error:
        raise WorkflowError(str(error)) from None


config = _validated(config)
# Every job started from here (Slurm's sbatch exports this environment) keeps compiled kernels in one shared place.
export_kernel_cache(config["kernel_cache"])
RUN = config["run"]
ROOT = f"results/{RUN}"
try:
    ARCHITECTURE, NUM_LAYERS = describe_teacher(config["teacher"]["spec"], config["teacher"]["num_layers"])
except (TeacherError, ValueError, OSError) as error:
    raise WorkflowError(f"teacher.spec: {error}") from None
LAYERS = list(range(NUM_LAYERS))


def _ks():
    selection = config["selection"]
    try:
        ks = {k_from_ratio(NUM_LAYERS, r) for r in selection["ratios"]}
    except ValueError as error:
        raise WorkflowError(f"config: selection.ratios: {error}") from None
    for k in selection["ks"]:
        if k > NUM_LAYERS:
            raise WorkflowError(f"config: selection.ks: K={k} is larger than the teacher's {NUM_LAYERS} layers")
        ks.add(k)
    if "user" in selection["selectors"]:
        try:
            validate_layer_list(selection["user_layers"], NUM_LAYERS, "selection.user_layers")
        except ValueError as error:
            raise WorkflowError(f"config: {error}") from None
        if not selection["user_layers"]:
            raise WorkflowError("config: selection.user_layers must list layers when the `user` selector is on")
    if not ks:
        raise WorkflowError("config: selection.ratios and selection.ks give no K")
    return sorted(ks)


KS = _ks()
PROBE = config["mixer"]["probe"]
FINAL_MIXERS = config["mixer"]["final"]
EARLY_STOP_K = early_stop_k(config, NUM_LAYERS)
if EARLY_STOP_K > NUM_LAYERS:
    raise WorkflowError(f"config: scoring.early_stop.k={EARLY_STOP_K} is larger than {NUM_LAYERS} layers")


SCORING_STEPS, MAX_ROUNDS = scoring_rounds(config)
SNAPSHOT_EVERY = config["scoring"]["snapshot_every"]
# A live scoring job trains snapshots_per_job rounds; its file and its checkpoint are named by the last of them.
JOB_ENDS = job_ends(MAX_ROUNDS, config["scoring"]["snapshots_per_job"])
LIVE_EARLY_STOP = config["scoring"]["early_stop"]["enabled"]
LIVE_RACING = LIVE_EARLY_STOP and config["scoring"]["racing"]["enabled"]  # a reference run only replays the race
SCORING_FULL_TOKENS = NUM_LAYERS * SCORING_STEPS * tokens_per_step(config, config["scoring"]["stage2"])


def selection_names(k):
    """Names of the chosen layer sets at K: one per selector, one per random seed."""
    names = []
    for selector in config["selection"]["selectors"]:
        if selector == "random":
            names += [f"random_seed{seed}" for seed in config["selection"]["random_seeds"]]
        elif selector == "user":
            if len(config["selection"]["user_layers"]) == k:
                names.append("user")
        else:
            names.append(selector)
    return names


def selector_of(selection):
    return "random" if selection.startswith("random_seed") else selection


def seed_of(selection):
    match = re.fullmatch(r"random_seed(\d+)", selection)
    return int(match.group(1)) if match else config["seed"]


wildcard_constraints:
    mixer="gdn|gla",
    layer=r"\d+",
    round=r"\d+",
    step=r"\d+",
    k=r"\d+",
    selection=r"[a-z0-9_]+",
    slice="|".join(SLICES),


# ---- paths ---------------------------------------------------------------------------------------------
RUN_CONFIG = f"{ROOT}/config.yaml"  # the whole resolved config, for the record; jobs read their slices below
TEACHER_DIR = f"{ROOT}/teacher"
DATA_DIR = f"{ROOT}/data"
DATA_FILES = [f"{DATA_DIR}/{split}.{ext}" for split in ("train", "heldout") for ext in ("bin", "json")]
TEACHER_CACHE = f"{ROOT}/teacher_cache/train_hidden.bin"  # its sidecar: the same name with .json
TEACHER_CACHE_FILES = [TEACHER_CACHE, os.path.splitext(TEACHER_CACHE)[0] + ".json"]
LOGS = f"{ROOT}/logs"
BENCH = f"{ROOT}/benchmarks"


def config_slice_file(name):
    """The part of the config a job reads (hybrid_distill/config/reads.py): a job reruns when it changes."""
    return f"{ROOT}/config/{name}.yaml"


def stage1_dir(mixer):
    return f"{ROOT}/{mixer}/all_linear/stage1"


def stage1_model(mixer):
    return f"{stage1_dir(mixer)}/model.safetensors"


def swap_score(mixer, layer, round):
    return f"{ROOT}/{mixer}/swap/layer{layer}/round{round}.json"


def round_decision(mixer, round):
    return f"{ROOT}/{mixer}/selection/rounds/round{round}.json"


def selection_file(mixer, selection, k):
    return f"{ROOT}/{mixer}/selection/{selection}_K{k}.json"


def hybrid_model(mixer, selection, k):
    return f"{ROOT}/{mixer}/hybrid/{selection}_K{k}/stage2/model.safetensors"


def eval_file(mixer, model):
    return f"{ROOT}/{mixer}/eval/{model}.json"


def efficiency_file(mixer, model):
    return f"{ROOT}/{mixer}/efficiency/{model}.json"


def final_round(wildcards):
    """The round at which scoring stopped: each round's checkpoint decides whether the next one is needed.
    Without the live rule every round runs, and no checkpoint is needed to know it."""
    if not LIVE_EARLY_STOP:
        return MAX_ROUNDS - 1
    for round in JOB_ENDS:
        decision = checkpoints.check_early_stop.get(mixer=wildcards.mixer, round=round).output[0]
        with open(decision) as handle:
            if json.load(handle)["stop"]:
                return round
    raise WorkflowError(f"{decision}: the last scoring round did not stop scoring; delete it to decide again")


def hybrid_models(mixer):
    return [hybrid_model(mixer, name, k) for k in KS for name in selection_names(k)]


def model_names(mixer):
    return ["all_linear"] + [f"{name}_K{k}" for k in KS for name in selection_names(k)]


def final_targets():
    targets = [RUN_CONFIG, f"{ROOT}/report.md"]
    for mixer in FINAL_MIXERS:
        targets += hybrid_models(mixer)
    return targets


def train_command(resources):
    """`accelerate launch` on GPUs, plain python on CPU: the same entry point either way. A rule's
    `accelerate_config` resource (e.g. profiles/slurm/accelerate-fsdp.yaml) becomes `--config_file`."""
    if resources.gpu <= 0:
        return "python -m hybrid_distill.cli"
    import shlex

    launch = f"accelerate launch --num_processes {resources.gpu}"
    accelerate_config = resources.get("accelerate_config")
    if accelerate_config:
        if not os.path.isfile(accelerate_config):
            raise WorkflowError(f"resources: accelerate_config={accelerate_config}: no such file (a path from the "
                                f"working directory {os.getcwd()}, or absolute)")
        launch += f" --config_file {shlex.quote(accelerate_config)}"
    return f"{launch} -m hybrid_distill.cli"


# ---- input functions of the phase files ---------------------------------------------------------------
def stage2_teacher_cache():
    """The teacher cache is an input of every stage-2 job when distill.teacher_cache is on, else nothing is."""
    return TEACHER_CACHE_FILES if config["distill"]["teacher_cache"]["enabled"] else []


def teacher_cache_option(wildcards, input):
    return f"--teacher-cache {input.teacher_cache[0]}" if input.teacher_cache else ""


def live_job_ends(last):
    """The rounds that end live scoring jobs, up to `last`."""
    return [end for end in JOB_ENDS if end <= last]


def previous_round(wildcards):
    """A live scoring job resumes where the layer's previous job ended."""
    earlier = live_job_ends(int(wildcards.round) - 1)
    return [swap_score(wildcards.mixer, wildcards.layer, earlier[-1])] if earlier else []


_RACING_AFTER = {}  # (mixer, round) -> layers its decision kept racing; a finished checkpoint never changes


def racing_after(mixer, round):
    if (mixer, round) not in _RACING_AFTER:
        with open(checkpoints.check_early_stop.get(mixer=mixer, round=round).output[0]) as handle:
            _RACING_AFTER[mixer, round] = set(json.load(handle)["racing"])
    return _RACING_AFTER[mixer, round]


def last_raced_round(mixer, layer, round):
    """The latest round <= `round` that `layer` trained in. With scoring.racing a decision drops layers for good,
    and a dropped layer's last score file stands for it in every later round's grid."""
    if not LIVE_RACING:
        return round
    for earlier in live_job_ends(round - 1):
        if layer not in racing_after(mixer, earlier):
            return earlier
    return round


def rounds_so_far(wildcards):
    """The score grid a decision reads: one row of files per live job (each holds its rounds) or per round of a
    reference run, one file per layer (a raced-out layer repeats its last)."""
    rows = live_job_ends(int(wildcards.round)) if LIVE_EARLY_STOP else range(MAX_ROUNDS)
    return [swap_score(wildcards.mixer, layer, last_raced_round(wildcards.mixer, layer, round))
            for round in rows for layer in LAYERS]


def final_scores(wildcards):
    last = final_round(wildcards)
    return [swap_score(wildcards.mixer, layer, last_raced_round(wildcards.mixer, layer, last)) for layer in LAYERS]


def all_decisions(wildcards):
    rounds = live_job_ends(final_round(wildcards)) if LIVE_EARLY_STOP else range(MAX_ROUNDS)
    return [round_decision(wildcards.mixer, round) for round in rounds]


SIGNAL_SOURCES = {
    "act_mse": "bypass", "lm_ppl": "bypass", "ar": "bypass", "kv": "bypass",
    "ga_s1": "stage1", "gr_s1": "stage1", "avg_s1": "stage1", "gr_s2": "removal",
}


def selection_inputs(wildcards):
    """What a selector reads: nothing for layouts, its signal file, or the GA-S2 ranking."""
    selector = selector_of(wildcards.selection)
    inputs = {}
    if selector in ("ga_s2", "avg_s2"):
        inputs["importance"] = f"{ROOT}/{wildcards.mixer}/selection/importance.csv"
        inputs["early_stop"] = f"{ROOT}/{wildcards.mixer}/selection/early_stop.json"
    if selector == "avg_s2":
        inputs["signals"] = f"{ROOT}/{wildcards.mixer}/selection/signals/removal.json"
    elif selector in ("act_mse", "lm_ppl", "ar", "kv"):
        inputs["signals"] = f"{ROOT}/signals/bypass.json"
    elif selector in SIGNAL_SOURCES:
        inputs["signals"] = f"{ROOT}/{wildcards.mixer}/selection/signals/{SIGNAL_SOURCES[selector]}.json"
    elif selector == "ga_iter":
        inputs["greedy"] = greedy_choice(wildcards.mixer, int(wildcards.k) - 1)
    return inputs


# ---- GA-iter: greedy step i scores every layer not yet picked with the picks so far softmax -----------
def greedy_score(mixer, step, layer):
    return f"{ROOT}/{mixer}/greedy/step{step}/layer{layer}/score.json"


def greedy_choice(mixer, step):
    return f"{ROOT}/{mixer}/selection/greedy/step{step}.json"


def greedy_step_record(mixer, step):
    """What greedy step `step` decided (a checkpoint: the next step's jobs are planned once it has run)."""
    path = checkpoints.choose_greedy_layer.get(mixer=mixer, step=step).output[0]
    try:
        return read_greedy_choice(path)
    except ScoreFileError as error:
        raise WorkflowError(str(error)) from None


def greedy_candidates(wildcards):
    step = int(wildcards.step)
    chosen = greedy_step_record(wildcards.mixer, step - 1)["chosen"] if step > 0 else []
    return [layer for layer in LAYERS if layer not in chosen]


def greedy_step_scores(wildcards):
    """Step 0 has nothing picked, so its jobs are GA-S2's one-swap jobs: it reads their final-round scores."""
    step = int(wildcards.step)
    if step == 0:
        return final_scores(wildcards)
    return [greedy_score(wildcards.mixer, step, layer) for layer in greedy_candidates(wildcards)]


def previous_greedy_step(wildcards):
    step = int(wildcards.step)
    return [greedy_choice(wildcards.mixer, step - 1)] if step > 0 else []


def greedy_softmax_layers(wildcards):
    """--softmax-layers of a greedy scoring job: the picks so far plus its candidate."""
    chosen = greedy_step_record(wildcards.mixer, int(wildcards.step) - 1)["chosen"]
    if int(wildcards.layer) in chosen:
        raise WorkflowError(f"greedy step {wildcards.step}: layer {wildcards.layer} was already picked")
    return ",".join(str(layer) for layer in sorted([*chosen, int(wildcards.layer)]))


def greedy_train_steps(wildcards):
    return greedy_step_record(wildcards.mixer, int(wildcards.step) - 1)["train_steps"]


RECALL_DIR = f"{ROOT}/recall"


def ratio_of(k):
    """The configured softmax ratio that produced K, else K / L."""
    for ratio in config["selection"]["ratios"]:
        if k_from_ratio(NUM_LAYERS, ratio) == k:
            return ratio
    return k / NUM_LAYERS


def model_dir_of(wildcards):
    if wildcards.model == "all_linear":
        return f"{ROOT}/{wildcards.mixer}/all_linear/stage2"
    return f"{ROOT}/{wildcards.mixer}/hybrid/{wildcards.model}/stage2"


def model_meta(wildcards):
    """--name/--kind/--selector/--k/--ratio arguments describing an evaluated model."""
    if wildcards.model == "all_linear":
        return f"--name all_linear --kind all_linear --mixer {wildcards.mixer}"
    selection, k = wildcards.model.rsplit("_K", 1)
    return (f"--name {wildcards.model} --kind hybrid --mixer {wildcards.mixer} --selector {selector_of(selection)}"
            f" --k {k} --ratio {ratio_of(int(k))}")


def report_inputs(wildcards):
    inputs = {
        "evals": [f"{ROOT}/eval/teacher.json"]
        + [eval_file(m, name) for m in FINAL_MIXERS for name in model_names(m)],
        "efficiency": [f"{ROOT}/efficiency/teacher.json"]
        + [efficiency_file(m, name) for m in FINAL_MIXERS for name in model_names(m)],
        "selections": [selection_file(PROBE, name, k) for k in KS for name in selection_names(k)],
    }
    if any(selector_of(n) in ("ga_s2", "avg_s2") for k in KS for n in selection_names(k)):
        inputs["importance"] = f"{ROOT}/{PROBE}/selection/importance.csv"
        inputs["early_stop"] = f"{ROOT}/{PROBE}/selection/early_stop.json"
    return inputs
