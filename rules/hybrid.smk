# Phase 5: final hybrids. Every selector's layers go through the identical pipeline and budget: the (exact,
# layer-local) stage 1 of the all-linear student with those layers restored, then a full stage 2.
# A selection made with the probe mixer can be trained with another mixer (mixer.final).


rule distill_hybrid:
    input:
        config=config_slice_file("stage2"),
        teacher=TEACHER_DIR,
        data=DATA_FILES,
        teacher_cache=stage2_teacher_cache(),
        stage1=stage1_model("{mixer}"),
        selection=selection_file(PROBE, "{selection}", "{k}"),
    output:
        f"{ROOT}/{{mixer}}/hybrid/{{selection}}_K{{k}}/stage2/model.safetensors",
    params:
        cache=teacher_cache_option,
        data=lambda wc, input: os.path.dirname(input.data[0]),
        init=lambda wc: stage1_dir(wc.mixer),
        out=lambda wc, output: os.path.dirname(output[0]),
        launch=lambda wc, resources: train_command(resources),
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/{{mixer}}/distill_hybrid/{{selection}}_K{{k}}.log",
    benchmark:
        f"{BENCH}/{{mixer}}/distill_hybrid/{{selection}}_K{{k}}.tsv"
    resources:
        gpu=0,
    shell:
        "{params.launch} --threads {threads} distill-stage2 --config {input.config} --stage distill.stage2 --teacher {input.teacher}"
        " --data {params.data} --init {params.init} --selection {input.selection} --out {params.out} {params.cache} 2> {log}"
