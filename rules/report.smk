# Phase 7: tables (CSV, LaTeX, Markdown), figures and report.md from every evaluation of the run.


rule make_report:
    input:
        unpack(report_inputs),
    output:
        report=f"{ROOT}/report.md",
        tables=directory(f"{ROOT}/report"),
    params:
        title=RUN,
        importance=lambda wc, input: f"--importance {input.importance}" if "importance" in input.keys() else "",
        early_stop=lambda wc, input: f"--early-stop {input.early_stop}" if "early_stop" in input.keys() else "",
    conda:
        "../envs/hybrid-distill.yaml"
    log:
        f"{LOGS}/make_report.log",
    shell:
        "hybrid-distill --threads {threads} make-report --title {params.title} --evals {input.evals} --efficiency {input.efficiency}"
        " --selections {input.selections} {params.importance} {params.early_stop}"
        " --out {output.tables} --report {output.report} 2> {log}"


localrules: make_report
