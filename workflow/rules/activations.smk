# Layer inputs. `layer_inputs`: decoder layer 0's input (the embeddings of the calibration windows), all the
# sequential passes start from. `activations`: the dense model's input to every decoder layer, one Parquet
# per layer boundary, built only when a setting needs the dense model's own hidden states (a `dense_stream`
# target or `inputs: dense` reconstruction); both depend only on model + calibration.

rule layer_inputs:
    input:
        model=MODEL_INPUT,
        calibration=f"{R}/calibration.parquet",
    output:
        directory(INPUTS),
    params:
        deps=slice_of("device", "model.dtype", "activations.row_group_size", "forward_batch"),
    threads: THREADS
    resources:
        **rule_resources("layer_inputs"),
    log:
        f"{R}/logs/layer_inputs.log",
    benchmark:
        f"{R}/benchmarks/layer_inputs/layer_inputs.tsv"
    shell:
        "{STAGE} layer_inputs --config {CONFIG_JSON} model_dir={MODEL:q} calibration_file={input.calibration:q} "
        "out={output:q} 2>&1 | tee {log:q}"


rule activations:
    input:
        model=MODEL_INPUT,
        calibration=f"{R}/calibration.parquet",
    output:
        directory(DENSE),
    params:
        deps=slice_of("threads", "device", "model.dtype", "activations", "forward_batch"),
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
