# First prune (one-shot, sequential) and the prune1+adjust ablation.

rule prune1:
    input:
        model=MODEL_INPUT,
        inputs=INPUTS,
    output:
        directory(f"{R}/{{method}}/{{pattern}}/prune1"),
    params:
        deps=pruner_slice("threads", "device", "model.dtype", "activations", "forward_batch"),
        cache_stream="true" if PRUNED_STREAM else "false",
    threads: THREADS
    resources:
        **rule_resources("prune1"),
    log:
        f"{R}/logs/prune1/{{method}}_{{pattern}}.log",
    benchmark:
        f"{R}/benchmarks/prune1/{{method}}_{{pattern}}.tsv"
    shell:
        "{STAGE} prune1 --config {CONFIG_JSON} model_dir={MODEL:q} inputs_dir={input.inputs:q} "
        "method={wildcards.method} pattern={wildcards.pattern} cache_stream={params.cache_stream} out={output:q} "
        "2>&1 | tee {log:q}"


rule prune1_adjust:
    input:
        model=MODEL_INPUT,
        inputs=INPUTS,
        dense=DENSE if ADJUST_NEEDS_DENSE else [],
        prune1=f"{R}/{{method}}/{{pattern}}/prune1",
    output:
        directory(f"{R}/{{method}}/{{pattern}}/prune1_adjust"),
    params:
        deps=slice_of("threads", "device", "model.dtype", "forward_batch", "prune2.adjust", "prune2.adjust_steps",
                      "prune2.adjust_target", "prune2.percdamp"),
        dense_arg=f"dense_dir={DENSE}" if ADJUST_NEEDS_DENSE else "",
    threads: THREADS
    resources:
        **rule_resources("prune1_adjust"),
    log:
        f"{R}/logs/prune1_adjust/{{method}}_{{pattern}}.log",
    benchmark:
        f"{R}/benchmarks/prune1_adjust/{{method}}_{{pattern}}.tsv"
    shell:
        "{STAGE} prune1_adjust --config {CONFIG_JSON} model_dir={MODEL:q} inputs_dir={input.inputs:q} "
        "{params.dense_arg} prune1_dir={input.prune1:q} out={output:q} 2>&1 | tee {log:q}"
