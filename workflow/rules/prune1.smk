# First prune (one-shot, sequential; with sparsity_profile owl, each layer at its OWL ratio) and the
# prune1+adjust ablation (masks fixed: it keeps prune1's per-layer ratios).

rule prune1:
    input:
        model=MODEL_INPUT,
        inputs=INPUTS,
        owl=L.owl if OWL else [],
    output:
        directory(L.prune1()),
    params:
        deps=keys_of("prune1"),
        cache_stream="true" if PRUNED_STREAM else "false",
        owl_arg=f"owl_file={shlex.quote(L.owl)}" if OWL else "",
    threads: THREADS
    resources:
        **rule_resources("prune1"),
    log:
        L.log("prune1", "{method}", "{pattern}"),
    benchmark:
        L.benchmark("prune1", "{method}", "{pattern}")
    shell:
        "{STAGE} prune1 --config {CONFIG_JSON} model_dir={MODEL:q} inputs_dir={input.inputs:q} "
        "method={wildcards.method} pattern={wildcards.pattern} cache_stream={params.cache_stream} {params.owl_arg} "
        "out={output:q} "
        "2>&1 | tee {log:q}"


rule prune1_adjust:
    input:
        model=MODEL_INPUT,
        inputs=INPUTS,
        dense=DENSE if ADJUST_NEEDS_DENSE else [],
        prune1=L.prune1(),
    output:
        directory(L.checkpoint(stage="prune1_adjust")),
    params:
        deps=keys_of("prune1_adjust"),
        dense_arg=f"dense_dir={DENSE}" if ADJUST_NEEDS_DENSE else "",
    threads: THREADS
    resources:
        **rule_resources("prune1_adjust"),
    log:
        L.log("prune1_adjust", "{method}", "{pattern}"),
    benchmark:
        L.benchmark("prune1_adjust", "{method}", "{pattern}")
    shell:
        "{STAGE} prune1_adjust --config {CONFIG_JSON} model_dir={MODEL:q} inputs_dir={input.inputs:q} "
        "{params.dense_arg} prune1_dir={input.prune1:q} out={output:q} 2>&1 | tee {log:q}"
