# Loadable Hugging Face folders of the one-shot and prune1+adjust checkpoints (the SDS one is prune2's
# own `sds/model`), on request: `snakemake --cores 2 export` (a full model copy each, so not in `all`).

rule export_checkpoint:
    input:
        model=MODEL_INPUT,
        ckpt=L.checkpoint(),
    output:
        directory(L.export()),
    wildcard_constraints:
        stage="prune1|prune1_adjust",
    params:
        deps=keys_of("export"),
    resources:
        **rule_resources("export_checkpoint"),
    log:
        L.log("export", "{method}", "{pattern}", "{stage}"),
    benchmark:
        L.benchmark("export", "{method}", "{pattern}", "{stage}")
    shell:
        "{STAGE} export --config {CONFIG_JSON} model_dir={MODEL:q} checkpoint={input.ckpt:q} stage={wildcards.stage} "
        "method={wildcards.method} pattern={wildcards.pattern} out={output:q} 2>&1 | tee {log:q}"


rule export:
    input:
        [L.export(m, p, s) for m in METHODS for p in PATTERNS for s in ("prune1", "prune1_adjust")]
        + [L.sds(m, p, r) for m in METHODS for p in PATTERNS for r in RECONS],
