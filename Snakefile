# SDS (Sparse-Dense-Sparse) pruning pipeline. Run: `snakemake --cores 2` (see README.md).
# Rules are thin: each runs one stage function of src/sds/stages/ through `python -m sds.cli`; what they
# share (config, layout, params, resources) is in workflow/rules/common.smk.
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/calibration.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/prune1.smk"
include: "workflow/rules/reconstruct.smk"
include: "workflow/rules/prune2.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/export.smk"


# Cheap rules run inside the Snakemake process even with --executor slurm (a batch job would cost more
# in queueing than the work itself); every other rule is submitted as a job.
localrules: all, corpus, calibration, report, export


rule all:
    input:
        L.report_md,
    default_target: True
