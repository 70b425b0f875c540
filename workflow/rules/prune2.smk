# Second prune of the reconstructed model + weight adjustment: the final SDS checkpoint.

rule prune2:
    input:
        model=MODEL_INPUT,
        inputs=INPUTS,
        dense=DENSE if ADJUST_NEEDS_DENSE else [],
        prune1=f"{R}/{{method}}/{{pattern}}/prune1",
        reconstruct=lambda wc: f"{R}/{wc.method}/{wc.pattern}/{RECON_SOURCE[wc.recon]}/reconstruct",
    output:
        directory(f"{R}/{{method}}/{{pattern}}/{{recon}}/sds"),
    params:
        deps=lambda wc: json.dumps({"pruner": json.loads(pruner_slice("threads", "device", "model.dtype", "forward_batch")(wc)),
                                    "prune2": second_prune_settings(RESOLVED, wc.recon)}, sort_keys=True),
        dense_arg=f"dense_dir={DENSE}" if ADJUST_NEEDS_DENSE else "",
    threads: THREADS
    resources:
        **rule_resources("prune2"),
    log:
        f"{R}/logs/prune2/{{method}}_{{pattern}}_{{recon}}.log",
    benchmark:
        f"{R}/benchmarks/prune2/{{method}}_{{pattern}}_{{recon}}.tsv"
    shell:
        "{STAGE} prune2 --config {CONFIG_JSON} model_dir={MODEL:q} inputs_dir={input.inputs:q} {params.dense_arg} "
        "prune1_dir={input.prune1:q} reconstruct_dir={input.reconstruct:q} method={wildcards.method} "
        "pattern={wildcards.pattern} recon={wildcards.recon} out={output:q} 2>&1 | tee {log:q}"
