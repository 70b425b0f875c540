# Dense activation cache: every decoder layer's input (= previous layer's dense output), one Parquet per
# layer boundary. Depends only on model + calibration, so every pruning config reuses it.

rule activations:
    input:
        model=MODEL_INPUT,
        calibration=f"{R}/calibration.parquet",
    output:
        directory(f"{R}/activations/dense"),
    params:
        deps=slice_of("threads", "device", "model.dtype", "activations"),
    threads: THREADS
    resources:
        **rule_resources("activations"),
    log:
        f"{R}/logs/activations.log",
    benchmark:
        f"{R}/benchmarks/activations/activations.tsv"
    shell:
        "{STAGE} activations --config {CONFIG_JSON} model_dir={MODEL:q} calibration_file={input.calibration:q} "
        "out={output:q} 2>&1 | tee {log:q}"
