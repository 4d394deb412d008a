# hybrid-distill: KL-guided layer selection for softmax/linear hybrids.
#   snakemake --cores 2                      the embedded default (config.yaml)
#   snakemake --profile profiles/slurm -n     plan a cluster run
from snakemake.utils import min_version

min_version("9.0")


if not workflow.overwrite_configfiles:  # a --configfile replaces the embedded default instead of merging into it

    configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/linearize.smk"
include: "rules/score.smk"
include: "rules/select.smk"
include: "rules/hybrid.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"


rule all:
    input:
        final_targets(),
    default_target: True
