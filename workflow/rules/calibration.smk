# Calibration windows (token ids) sampled from the configured text source.

rule calibration:
    input:
        model=MODEL_INPUT,
        corpus=L.corpus if BUILTIN else [],
        text=CALIBRATION_TEXT,
    output:
        L.calibration,
    params:
        deps=keys_of("calibration"),
        corpus_arg=f"corpus_dir={L.corpus}" if BUILTIN else "",
    log:
        L.log("calibration"),
    benchmark:
        L.benchmark("calibration")
    shell:
        "{STAGE} calibration --config {CONFIG_JSON} model_dir={MODEL:q} {params.corpus_arg} out={output:q} "
        "2>&1 | tee {log:q}"
