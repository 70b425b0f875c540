"""The stages: one function per Snakemake rule, each run by `python -m sds.cli <stage>` in its own process.
`MODULES` says which module of this package holds each stage (the CLI imports only that one)."""

MODULES = {
    "corpus": "build", "build_model": "build", "zeroshot_tasks": "build",
    "calibration": "calibrate", "layer_inputs": "calibrate", "activations": "calibrate", "owl": "calibrate",
    "prune1": "compress", "prune1_adjust": "compress", "reconstruct": "compress", "reconstruct_one_layer": "compress",
    "reconstruct_gather": "compress", "prune2": "compress",
    "export": "evaluate", "evaluate": "evaluate", "report": "evaluate",
}
