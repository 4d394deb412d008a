# Phase 6: evaluation of the teacher, the all-linear student and every hybrid (offline recall suite through
# lm-eval, held-out perplexity), and inference efficiency (prefill, decode, cache bytes).

rule make_recall_data:
    threads: 8  # the whole machine locally (capped at --cores); on Slurm, set-threads in the profile decides
    input:
        config=config_slice_file("recall-data"),
        teacher=TEACHER_DIR,
        data=DATA_FILES,
    output:
        directory(RECALL_DIR),
    params:
        data=lambda wc, input: os.path.dirname(input.data[0]),
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/make_recall_data.log",
    shell:
        "hybrid-distill --threads {threads} make-recall-data --config {input.config} --teacher {input.teacher} --data {params.data}"
        " --out {output} 2> {log}"


rule evaluate_teacher:
    input:
        config=config_slice_file("evaluate"),
        model=TEACHER_DIR,
        recall=RECALL_DIR,
        data=DATA_FILES,
    output:
        f"{ROOT}/eval/teacher.json",
    params:
        data=lambda wc, input: os.path.dirname(input.data[0]),
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/evaluate_teacher.log",
    benchmark:
        f"{BENCH}/evaluate_teacher.tsv"
    resources:
        gpu=0,
    shell:
        "hybrid-distill --threads {threads} evaluate --config {input.config} --model {input.model} --recall {input.recall}"
        " --data {params.data} --name teacher --kind teacher --out {output} 2> {log}"


rule evaluate_model:
    input:
        config=config_slice_file("evaluate"),
        model=lambda wc: f"{model_dir_of(wc)}/model.safetensors",
        recall=RECALL_DIR,
        data=DATA_FILES,
    output:
        f"{ROOT}/{{mixer}}/eval/{{model}}.json",
    params:
        data=lambda wc, input: os.path.dirname(input.data[0]),
        model=model_dir_of,
        meta=model_meta,
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/{{mixer}}/evaluate/{{model}}.log",
    benchmark:
        f"{BENCH}/{{mixer}}/evaluate/{{model}}.tsv"
    resources:
        gpu=0,
    shell:
        "hybrid-distill --threads {threads} evaluate --config {input.config} --model {params.model} --recall {input.recall}"
        " --data {params.data} {params.meta} --out {output} 2> {log}"


rule measure_teacher_efficiency:
    input:
        config=config_slice_file("efficiency"),
        model=TEACHER_DIR,
    output:
        f"{ROOT}/efficiency/teacher.json",
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/measure_teacher_efficiency.log",
    resources:
        gpu=0,
    shell:
        "hybrid-distill --threads {threads} measure-efficiency --config {input.config} --model {input.model} --name teacher"
        " --kind teacher --out {output} 2> {log}"


rule measure_efficiency:
    input:
        config=config_slice_file("efficiency"),
        model=lambda wc: f"{model_dir_of(wc)}/model.safetensors",
    output:
        f"{ROOT}/{{mixer}}/efficiency/{{model}}.json",
    params:
        model=model_dir_of,
        meta=model_meta,
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/{{mixer}}/measure_efficiency/{{model}}.log",
    resources:
        gpu=0,
    shell:
        "hybrid-distill --threads {threads} measure-efficiency --config {input.config} --model {params.model} {params.meta}"
        " --out {output} 2> {log}"
