# Second prune of the reconstructed model + weight adjustment: the final SDS checkpoint.

rule prune2:
    input:
        model=MODEL_INPUT,
        inputs=INPUTS,
        dense=DENSE if ADJUST_NEEDS_DENSE else [],
        prune1=L.prune1(),
        reconstruct=lambda wc: L.reconstruct(wc.method, wc.pattern, RECON_SOURCE[wc.recon]),
    output:
        directory(L.sds()),
    params:
        deps=keys_of("prune2"),
        dense_arg=f"dense_dir={DENSE}" if ADJUST_NEEDS_DENSE else "",
    threads: THREADS
    resources:
        **rule_resources("prune2"),
    log:
        L.log("prune2", "{method}", "{pattern}", "{recon}"),
    benchmark:
        L.benchmark("prune2", "{method}", "{pattern}", "{recon}")
    shell:
        "{STAGE} prune2 --config {CONFIG_JSON} model_dir={MODEL:q} inputs_dir={input.inputs:q} {params.dense_arg} "
        "prune1_dir={input.prune1:q} reconstruct_dir={input.reconstruct:q} method={wildcards.method} "
        "pattern={wildcards.pattern} recon={wildcards.recon} out={output:q} 2>&1 | tee {log:q}"
