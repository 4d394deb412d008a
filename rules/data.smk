# Phase 1: the run's resolved config and each job's slice of it (a job reruns when its slice changes), the teacher
# as a local HF directory, the packed token streams and (when distill.teacher_cache is on) the teacher's final hidden
# states of the training rows stage 2 reads.


localrules: write_run_config, write_config_slice


rule write_run_config:
    output:
        RUN_CONFIG,
    params:
        resolved=config,
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/write_run_config.log",
    run:
        import yaml
        from hybrid_distill.distill.atomic import write_text_atomic

        write_text_atomic(Path(output[0]), yaml.safe_dump(params.resolved, sort_keys=False))


rule write_config_slice:
    output:
        config_slice_file("{slice}"),
    params:
        content=lambda wildcards: json.dumps(slice_file_content(config, wildcards.slice), sort_keys=True),
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/config/{{slice}}.log",
    run:
        import yaml
        from hybrid_distill.distill.atomic import write_text_atomic

        write_text_atomic(Path(output[0]), yaml.safe_dump(json.loads(params.content)))


rule prepare_teacher:
    threads: 8  # the whole machine locally (capped at --cores); on Slurm, set-threads in the profile decides
    input:
        config_slice_file("teacher"),
    output:
        directory(TEACHER_DIR),
    params:
        expect=f"--expect-layers {NUM_LAYERS}",
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/prepare_teacher.log",
    benchmark:
        f"{BENCH}/prepare_teacher.tsv"
    shell:
        "hybrid-distill --threads {threads} prepare-teacher --config {input} --out {output} {params.expect} 2> {log}"


rule prepare_data:
    threads: 8  # the whole machine locally (capped at --cores); on Slurm, set-threads in the profile decides
    input:
        config=config_slice_file("data"),
        teacher=TEACHER_DIR,
    output:
        DATA_FILES,
    params:
        out=lambda wc, output: os.path.dirname(output[0]),
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/prepare_data.log",
    benchmark:
        f"{BENCH}/prepare_data.tsv"
    shell:
        "hybrid-distill --threads {threads} prepare-data --config {input.config} --teacher {input.teacher} --out {params.out} 2> {log}"


rule cache_teacher_hidden:
    threads: 8  # the whole machine locally (capped at --cores); on Slurm, set-threads in the profile decides
    input:
        config=config_slice_file("teacher-cache"),
        teacher=TEACHER_DIR,
        data=DATA_FILES,
    output:
        cache=TEACHER_CACHE,
        sidecar=TEACHER_CACHE_FILES[1],
    params:
        data=lambda wc, input: os.path.dirname(input.data[0]),
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/cache_teacher_hidden.log",
    benchmark:
        f"{BENCH}/cache_teacher_hidden.tsv"
    resources:
        gpu=0,
    shell:
        "hybrid-distill --threads {threads} cache-teacher --config {input.config} --teacher {input.teacher}"
        " --data {params.data} --out {output.cache} 2> {log}"
