# Layer inputs. `layer_inputs`: decoder layer 0's input (the embeddings of the calibration windows), all the
# sequential passes start from. `activations`: the dense model's input to every decoder layer, one Parquet
# per layer boundary, built only when a setting needs the dense model's own hidden states (a `dense_stream`
# target or `inputs: dense` reconstruction); both depend only on model + calibration.

rule layer_inputs:
    input:
        model=MODEL_INPUT,
        calibration=L.calibration,
    output:
        directory(INPUTS),
    params:
        deps=keys_of("layer_inputs"),
    threads: THREADS
    resources:
        **rule_resources("layer_inputs"),
    log:
        L.log("layer_inputs"),
    benchmark:
        L.benchmark("layer_inputs")
    shell:
        "{STAGE} layer_inputs --config {CONFIG_JSON} model_dir={MODEL:q} calibration_file={input.calibration:q} "
        "out={output:q} 2>&1 | tee {log:q}"


rule activations:
    input:
        model=MODEL_INPUT,
        calibration=L.calibration,
    output:
        directory(DENSE),
    params:
        deps=keys_of("activations"),
    threads: THREADS
    resources:
        **rule_resources("activations"),
    log:
        L.log("activations"),
    benchmark:
        L.benchmark("activations")
    shell:
        "{STAGE} activations --config {CONFIG_JSON} model_dir={MODEL:q} calibration_file={input.calibration:q} "
        "out={output:q} 2>&1 | tee {log:q}"


# OWL's per-layer outlier fractions (prune.sparsity_profile: owl): one dense pass from layer 0's input;
# every prune1 turns them into its pattern's per-layer ratios.
rule owl:
    input:
        model=MODEL_INPUT,
        inputs=INPUTS,
    output:
        L.owl,
    params:
        deps=keys_of("owl"),
    threads: THREADS
    resources:
        **rule_resources("owl"),
    log:
        L.log("owl"),
    benchmark:
        L.benchmark("owl")
    shell:
        "{STAGE} owl --config {CONFIG_JSON} model_dir={MODEL:q} inputs_dir={input.inputs:q} out={output:q} "
        "2>&1 | tee {log:q}"
