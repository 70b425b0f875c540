# Dense reconstruction: pruned weights re-activated, each linear re-fitted with a sparse regulariser.

rule reconstruct:
    input:
        model=MODEL if BUILTIN else [],
        dense=f"{R}/activations/dense",
        prune1=f"{R}/{{method}}/{{pattern}}/prune1",
    output:
        directory(f"{R}/{{method}}/{{pattern}}/{{recon}}/reconstruct"),
    params:
        deps=lambda wc: json.dumps({"settings": RESOLVED["reconstruct"][wc.recon], "threads": THREADS,
                                    "dtype": RESOLVED["model"]["dtype"]}, sort_keys=True),
    threads: THREADS
    log:
        f"{R}/logs/reconstruct/{{method}}_{{pattern}}_{{recon}}.log",
    benchmark:
        f"{R}/benchmarks/reconstruct/{{method}}_{{pattern}}_{{recon}}.tsv"
    shell:
        "{STAGE} reconstruct --config {CONFIG_JSON} model_dir={MODEL:q} dense_dir={input.dense:q} "
        "prune1_dir={input.prune1:q} recon={wildcards.recon} out={output:q} 2>&1 | tee {log:q}"
