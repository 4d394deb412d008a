# Phase 2: the all-linear student. Stage 1 runs once per mixer; every later student starts from it.


rule distill_all_linear_stage1:
    threads: 8  # the whole machine locally (capped at --cores); on Slurm, set-threads in the profile decides
    input:
        config=config_slice_file("stage1"),
        teacher=TEACHER_DIR,
        data=DATA_FILES,
    output:
        model=stage1_model("{mixer}"),
        layer_mse=f"{ROOT}/{{mixer}}/all_linear/stage1/layer_mse.json",
    params:
        data=lambda wc, input: os.path.dirname(input.data[0]),
        out=lambda wc: stage1_dir(wc.mixer),
        launch=lambda wc, resources: train_command(resources),
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/{{mixer}}/distill_all_linear_stage1.log",
    benchmark:
        f"{BENCH}/{{mixer}}/distill_all_linear_stage1.tsv"
    resources:
        gpu=0,
    shell:
        "{params.launch} --threads {threads} distill-stage1 --config {input.config} --teacher {input.teacher} --data {params.data}"
        " --mixer {wildcards.mixer} --out {params.out} 2> {log}"


rule distill_all_linear_stage2:
    threads: 8  # the whole machine locally (capped at --cores); on Slurm, set-threads in the profile decides
    input:
        config=config_slice_file("stage2"),
        teacher=TEACHER_DIR,
        data=DATA_FILES,
        teacher_cache=stage2_teacher_cache(),
        stage1=stage1_model("{mixer}"),
    output:
        f"{ROOT}/{{mixer}}/all_linear/stage2/model.safetensors",
    params:
        cache=teacher_cache_option,
        data=lambda wc, input: os.path.dirname(input.data[0]),
        init=lambda wc: stage1_dir(wc.mixer),
        out=lambda wc, output: os.path.dirname(output[0]),
        launch=lambda wc, resources: train_command(resources),
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/{{mixer}}/distill_all_linear_stage2.log",
    benchmark:
        f"{BENCH}/{{mixer}}/distill_all_linear_stage2.tsv"
    resources:
        gpu=0,
    shell:
        "{params.launch} --threads {threads} distill-stage2 --config {input.config} --stage distill.stage2 --teacher {input.teacher}"
        " --data {params.data} --init {params.init} --softmax-layers none --out {params.out} {params.cache} 2> {log}"
