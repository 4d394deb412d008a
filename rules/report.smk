# Phase 7: tables (CSV, LaTeX, Markdown), figures and report.md from every evaluation of the run.


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


rule make_report:
    input:
        unpack(report_inputs),
    output:
        report=f"{ROOT}/report.md",
        tables=directory(f"{ROOT}/report"),
    params:
        importance=lambda wc, input: f"--importance {input.importance}" if "importance" in input.keys() else "",
        early_stop=lambda wc, input: f"--early-stop {input.early_stop}" if "early_stop" in input.keys() else "",
    log:
        f"{LOGS}/make_report.log",
    shell:
        "hybrid-distill --threads {threads} make-report --title {RUN} --evals {input.evals} --efficiency {input.efficiency}"
        " --selections {input.selections} {params.importance} {params.early_stop}"
        " --out {output.tables} --report {output.report} 2> {log}"


localrules: make_report
