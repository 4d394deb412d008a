# Phase 3: one-swap scoring. Each layer's stage 2 advances in rounds of `snapshot_every` steps, a held-out KL
# snapshot at the end of each; a live job trains `snapshots_per_job` rounds and is named by its last. After every
# such job a checkpoint applies the rolling-Jaccard rule to every round so far and decides whether (and for which
# layers, with racing) the next job is scheduled.
# With scoring.early_stop.enabled: false (a reference run) nothing is decided live: one job per layer scores
# every round, one job applies the rule to every round, and early_stop.json says where it would have stopped.


if config["scoring"]["early_stop"]["enabled"]:

    rule score_layer:
        input:
            config=config_slice_file("scoring"),
            teacher=TEACHER_DIR,
            data=DATA_FILES,
            teacher_cache=stage2_teacher_cache(),
            stage1=stage1_model("{mixer}"),
            previous=previous_round,
        output:
            f"{ROOT}/{{mixer}}/swap/layer{{layer}}/round{{round}}.json",
        params:
            cache=teacher_cache_option,
            data=lambda wc, input: os.path.dirname(input.data[0]),
            init=lambda wc: stage1_dir(wc.mixer),
            out=lambda wc: f"{ROOT}/{wc.mixer}/swap/layer{wc.layer}/stage2",
            stop=lambda wc: min((int(wc.round) + 1) * SNAPSHOT_EVERY, SCORING_STEPS),
            launch=lambda wc, resources: train_command(resources),
        conda:
            "../envs/hybrid-distill.yaml"
        log:
            f"{LOGS}/{{mixer}}/score_layer/layer{{layer}}_round{{round}}.log",
        benchmark:
            f"{BENCH}/{{mixer}}/score_layer/layer{{layer}}_round{{round}}.tsv"
        resources:
            gpu=0,
        shell:
            "{params.launch} --threads {threads} distill-stage2 --config {input.config} --stage scoring.stage2 --teacher {input.teacher}"
            " --data {params.data} --init {params.init} --softmax-layers {wildcards.layer} --out {params.out} {params.cache}"
            " --stop-after-step {params.stop} --score-out {output} --score-job-rounds --no-model 2> {log}"

    checkpoint check_early_stop:
        input:
            config=config_slice_file("rounds"),
            scores=rounds_so_far,
        output:
            f"{ROOT}/{{mixer}}/selection/rounds/round{{round}}.json",
        params:
            k=EARLY_STOP_K,
            layers=NUM_LAYERS,
            max_rounds=MAX_ROUNDS,
        conda:
            "../envs/hybrid-distill.yaml"
        log:
            f"{LOGS}/{{mixer}}/check_early_stop/round{{round}}.log",
        shell:
            "hybrid-distill --threads {threads} check-round --config {input.config} --layers {params.layers} --k {params.k}"
            " --max-rounds {params.max_rounds} --scores {input.scores} --out {output} 2> {log}"


else:
    # Without the live rule no round decides anything: one job per layer trains the whole scoring budget and
    # writes every round's score on the way (no process start, load or state save per round); one job then
    # applies the rule to every round, so early_stop.json says where it would have stopped.

    rule score_layer:
        input:
            config=config_slice_file("scoring"),
            teacher=TEACHER_DIR,
            data=DATA_FILES,
            teacher_cache=stage2_teacher_cache(),
            stage1=stage1_model("{mixer}"),
        output:
            [swap_score("{mixer}", "{layer}", round) for round in range(MAX_ROUNDS)],
        params:
            cache=teacher_cache_option,
            data=lambda wc, input: os.path.dirname(input.data[0]),
            init=lambda wc: stage1_dir(wc.mixer),
            out=lambda wc: f"{ROOT}/{wc.mixer}/swap/layer{wc.layer}/stage2",
            rounds=lambda wc: f"{ROOT}/{wc.mixer}/swap/layer{wc.layer}",
            launch=lambda wc, resources: train_command(resources),
        conda:
            "../envs/hybrid-distill.yaml"
        log:
            f"{LOGS}/{{mixer}}/score_layer/layer{{layer}}_all_rounds.log",
        benchmark:
            f"{BENCH}/{{mixer}}/score_layer/layer{{layer}}_all_rounds.tsv"
        resources:
            gpu=0,
        shell:
            "{params.launch} --threads {threads} distill-stage2 --config {input.config} --stage scoring.stage2"
            " --teacher {input.teacher} --data {params.data} --init {params.init} --softmax-layers {wildcards.layer}"
            " --out {params.out} {params.cache} --score-rounds-dir {params.rounds} --no-model 2> {log}"

    rule check_early_stop:  # every round's decision in one job: none of them changes the DAG
        input:
            config=config_slice_file("rounds"),
            scores=rounds_so_far,
        output:
            [round_decision("{mixer}", round) for round in range(MAX_ROUNDS)],
        params:
            k=EARLY_STOP_K,
            layers=NUM_LAYERS,
            max_rounds=MAX_ROUNDS,
        conda:
            "../envs/hybrid-distill.yaml"
        log:
            f"{LOGS}/{{mixer}}/check_early_stop/all_rounds.log",
        shell:
            "hybrid-distill --threads {threads} check-round --config {input.config} --layers {params.layers}"
            " --k {params.k} --max-rounds {params.max_rounds} --scores {input.scores} --out {output} 2> {log}"


rule rank_layers:
    input:
        final_scores,
    output:
        f"{ROOT}/{{mixer}}/selection/importance.csv",
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/{{mixer}}/rank_layers.log",
    shell:
        "hybrid-distill --threads {threads} rank-layers --scores {input} --out {output} 2> {log}"


rule write_early_stop:
    input:
        config=config_slice_file("rounds"),
        decisions=all_decisions,
        scores=final_scores,
    output:
        f"{ROOT}/{{mixer}}/selection/early_stop.json",
    params:
        layers=NUM_LAYERS,
        full=SCORING_FULL_TOKENS,
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/{{mixer}}/write_early_stop.log",
    shell:
        "hybrid-distill --threads {threads} write-early-stop --config {input.config} --layers {params.layers}"
        " --decisions {input.decisions} --scores {input.scores} --full-budget {params.full} --out {output} 2> {log}"


localrules: check_early_stop, rank_layers, write_early_stop
