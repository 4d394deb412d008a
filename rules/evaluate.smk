# Phase 6: evaluation of the teacher, the all-linear student and every hybrid (offline recall suite through
# lm-eval, held-out perplexity), and inference efficiency (prefill, decode, cache bytes).

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


rule make_recall_data:
    threads: workflow.cores  # nothing else can run beside it
    input:
        config=RUN_CONFIG,
        teacher=TEACHER_DIR,
        data=DATA_FILES,
    output:
        directory(RECALL_DIR),
    log:
        f"{LOGS}/make_recall_data.log",
    shell:
        "hybrid-distill --threads {threads} make-recall-data --config {input.config} --teacher {input.teacher} --data {DATA_DIR}"
        " --out {output} 2> {log}"


rule evaluate_teacher:
    input:
        config=RUN_CONFIG,
        model=TEACHER_DIR,
        recall=RECALL_DIR,
        data=DATA_FILES,
    output:
        f"{ROOT}/eval/teacher.json",
    log:
        f"{LOGS}/evaluate_teacher.log",
    benchmark:
        f"{BENCH}/evaluate_teacher.tsv"
    resources:
        gpus=0,
    shell:
        "hybrid-distill --threads {threads} evaluate --config {input.config} --model {input.model} --recall {input.recall}"
        " --data {DATA_DIR} --name teacher --kind teacher --out {output} 2> {log}"


rule evaluate_model:
    input:
        config=RUN_CONFIG,
        model=lambda wc: f"{model_dir_of(wc)}/model.safetensors",
        recall=RECALL_DIR,
        data=DATA_FILES,
    output:
        f"{ROOT}/{{mixer}}/eval/{{model}}.json",
    params:
        model=model_dir_of,
        meta=model_meta,
    log:
        f"{LOGS}/{{mixer}}/evaluate/{{model}}.log",
    benchmark:
        f"{BENCH}/{{mixer}}/evaluate/{{model}}.tsv"
    resources:
        gpus=0,
    shell:
        "hybrid-distill --threads {threads} evaluate --config {input.config} --model {params.model} --recall {input.recall}"
        " --data {DATA_DIR} {params.meta} --out {output} 2> {log}"


rule measure_teacher_efficiency:
    input:
        config=RUN_CONFIG,
        model=TEACHER_DIR,
    output:
        f"{ROOT}/efficiency/teacher.json",
    log:
        f"{LOGS}/measure_teacher_efficiency.log",
    resources:
        gpus=0,
    shell:
        "hybrid-distill --threads {threads} measure-efficiency --config {input.config} --model {input.model} --name teacher"
        " --kind teacher --out {output} 2> {log}"


rule measure_efficiency:
    input:
        config=RUN_CONFIG,
        model=lambda wc: f"{model_dir_of(wc)}/model.safetensors",
    output:
        f"{ROOT}/{{mixer}}/efficiency/{{model}}.json",
    params:
        model=model_dir_of,
        meta=model_meta,
    log:
        f"{LOGS}/{{mixer}}/measure_efficiency/{{model}}.log",
    resources:
        gpus=0,
    shell:
        "hybrid-distill --threads {threads} measure-efficiency --config {input.config} --model {params.model} {params.meta}"
        " --out {output} 2> {log}"
