# Calibration windows (token ids) sampled from the configured text source.

rule calibration:
    input:
        model=MODEL_INPUT,
        corpus=f"{R}/corpus" if BUILTIN else [],
        text=CALIBRATION_TEXT,
    output:
        f"{R}/calibration.parquet",
    params:
        deps=slice_of("seed", "calibration", "model.source"),
        corpus_arg=f"corpus_dir={R}/corpus" if BUILTIN else "",
    log:
        f"{R}/logs/calibration.log",
    benchmark:
        f"{R}/benchmarks/calibration/calibration.tsv"
    shell:
        "{STAGE} calibration --config {CONFIG_JSON} model_dir={MODEL:q} {params.corpus_arg} out={output:q} "
        "2>&1 | tee {log:q}"
