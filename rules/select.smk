# Phase 4: importance signals of the baselines and the chosen softmax layers of every selector at every K.
# GA-iter runs greedy steps: a checkpoint per step picks a layer and so plans the next step's scoring jobs.


rule score_bypass:
    input:
        config=config_slice_file("bypass-signals"),
        teacher=TEACHER_DIR,
        data=DATA_FILES,
    output:
        f"{ROOT}/signals/bypass.json",
    params:
        data=lambda wc, input: os.path.dirname(input.data[0]),
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/score_bypass.log",
    benchmark:
        f"{BENCH}/score_bypass.tsv"
    shell:
        "hybrid-distill --threads {threads} score-bypass --config {input.config} --teacher {input.teacher} --data {params.data}"
        " --out {output} 2> {log}"


rule score_stage1_signals:
    input:
        config=config_slice_file("stage1-signals"),
        teacher=TEACHER_DIR,
        data=DATA_FILES,
        stage1=stage1_model("{mixer}"),
    output:
        f"{ROOT}/{{mixer}}/selection/signals/stage1.json",
    params:
        data=lambda wc, input: os.path.dirname(input.data[0]),
        stage1=lambda wc: stage1_dir(wc.mixer),
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/{{mixer}}/score_stage1_signals.log",
    benchmark:
        f"{BENCH}/{{mixer}}/score_stage1_signals.tsv"
    shell:
        "hybrid-distill --threads {threads} score-stage1 --config {input.config} --teacher {input.teacher} --data {params.data}"
        " --stage1 {params.stage1} --out {output} 2> {log}"


rule score_removal:
    """GR-S2: linearise layer l alone in the teacher (stage-1 weights) and adapt it with a brief stage 2."""
    input:
        config=config_slice_file("scoring"),
        teacher=TEACHER_DIR,
        data=DATA_FILES,
        teacher_cache=stage2_teacher_cache(),
        stage1=stage1_model("{mixer}"),
    output:
        f"{ROOT}/{{mixer}}/removal/layer{{layer}}/score.json",
    params:
        cache=teacher_cache_option,
        data=lambda wc, input: os.path.dirname(input.data[0]),
        init=lambda wc: stage1_dir(wc.mixer),
        others=lambda wc: ",".join(str(i) for i in LAYERS if i != int(wc.layer)) or "none",
        out=lambda wc: f"{ROOT}/{wc.mixer}/removal/layer{wc.layer}/stage2",
        launch=lambda wc, resources: train_command(resources),
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/{{mixer}}/score_removal/layer{{layer}}.log",
    benchmark:
        f"{BENCH}/{{mixer}}/score_removal/layer{{layer}}.tsv"
    resources:
        gpu=0,
    shell:
        "{params.launch} --threads {threads} distill-stage2 --config {input.config} --stage scoring.stage2 --teacher {input.teacher}"
        " --data {params.data} --init {params.init} --softmax-layers {params.others} --out {params.out} {params.cache}"
        " --score-out {output} --no-model 2> {log}"


rule collect_removal_scores:
    input:
        expand(f"{ROOT}/{{{{mixer}}}}/removal/layer{{layer}}/score.json", layer=LAYERS),
    output:
        f"{ROOT}/{{mixer}}/selection/signals/removal.json",
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/{{mixer}}/collect_removal_scores.log",
    shell:
        "hybrid-distill --threads {threads} removal-signal --scores {input} --out {output} 2> {log}"




rule score_greedy_candidate:
    """GA-iter step i >= 1: a brief stage 2 with the picks so far and this candidate softmax, as long as GA-S2's."""
    input:
        config=config_slice_file("scoring"),
        teacher=TEACHER_DIR,
        data=DATA_FILES,
        teacher_cache=stage2_teacher_cache(),
        stage1=stage1_model("{mixer}"),
        previous=previous_greedy_step,
    output:
        greedy_score("{mixer}", "{step}", "{layer}"),
    wildcard_constraints:
        step=r"[1-9]\d*",
    params:
        cache=teacher_cache_option,
        data=lambda wc, input: os.path.dirname(input.data[0]),
        init=lambda wc: stage1_dir(wc.mixer),
        softmax=greedy_softmax_layers,
        stop=greedy_train_steps,
        out=lambda wc, output: os.path.join(os.path.dirname(output[0]), "stage2"),
        launch=lambda wc, resources: train_command(resources),
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/{{mixer}}/score_greedy_candidate/step{{step}}_layer{{layer}}.log",
    benchmark:
        f"{BENCH}/{{mixer}}/score_greedy_candidate/step{{step}}_layer{{layer}}.tsv"
    resources:
        gpu=0,
    shell:
        "{params.launch} --threads {threads} distill-stage2 --config {input.config} --stage scoring.stage2 --teacher {input.teacher}"
        " --data {params.data} --init {params.init} --softmax-layers {params.softmax} --out {params.out} {params.cache}"
        " --stop-after-step {params.stop} --score-out {output} --no-model 2> {log}"


checkpoint choose_greedy_layer:
    """GA-iter step i: the best candidate joins the picks; the next step's jobs follow from this file."""
    input:
        previous=previous_greedy_step,
        scores=greedy_step_scores,
    output:
        greedy_choice("{mixer}", "{step}"),
    params:
        layers=NUM_LAYERS,
        candidates=lambda wc: ",".join(str(layer) for layer in greedy_candidates(wc)),
        previous=lambda wc, input: f"--previous {input.previous}" if input.previous else "",
        drop=lambda wc: "--drop-states" if int(wc.step) > 0 else "",  # step 0's states are GA-S2's to remove
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/{{mixer}}/choose_greedy_layer/step{{step}}.log",
    shell:
        "hybrid-distill --threads {threads} choose-greedy-layer --step {wildcards.step} --num-layers {params.layers}"
        " --candidates {params.candidates} --scores {input.scores} {params.previous} {params.drop}"
        " --out {output} 2> {log}"


rule select_layers:
    input:
        unpack(selection_inputs),
    output:
        f"{ROOT}/{{mixer}}/selection/{{selection}}_K{{k}}.json",
    params:
        selector=lambda wc: selector_of(wc.selection),
        seed=lambda wc: seed_of(wc.selection),
        signals=lambda wc, input: f"--signals {input.signals}" if "signals" in input.keys() else "",
        importance=lambda wc, input: f"--importance {input.importance}" if "importance" in input.keys() else "",
        greedy=lambda wc, input: f"--greedy {input.greedy}" if "greedy" in input.keys() else "",
        layers=NUM_LAYERS,
        user=lambda wc: "--user-layers " + ",".join(map(str, config["selection"]["user_layers"]))
        if wc.selection == "user" else "",
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/{{mixer}}/select_layers/{{selection}}_K{{k}}.log",
    shell:
        "hybrid-distill --threads {threads} select-layers --selector {params.selector} --k {wildcards.k}"
        " --num-layers {params.layers} --seed {params.seed} {params.signals} {params.importance} {params.greedy}"
        " {params.user} --out {output} 2> {log}"


localrules: collect_removal_scores, choose_greedy_layer, select_layers
