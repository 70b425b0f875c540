# Loadable Hugging Face folders of the one-shot and prune1+adjust checkpoints (the SDS one is prune2's
# own `sds/model`), on request: `snakemake --cores 2 export` (a full model copy each, so not in `all`).

rule export_checkpoint:
    input:
        model=MODEL_INPUT,
        ckpt=f"{R}/{{method}}/{{pattern}}/{{stage}}",
    output:
        directory(f"{R}/export/{{method}}/{{pattern}}/{{stage}}"),
    wildcard_constraints:
        stage="prune1|prune1_adjust",
    params:
        deps=slice_of("model.source"),
    resources:
        **rule_resources("export_checkpoint"),
    log:
        f"{R}/logs/export/{{method}}_{{pattern}}_{{stage}}.log",
    benchmark:
        f"{R}/benchmarks/export/{{method}}_{{pattern}}_{{stage}}.tsv"
    shell:
        "{STAGE} export --config {CONFIG_JSON} model_dir={MODEL:q} checkpoint={input.ckpt:q} stage={wildcards.stage} "
        "method={wildcards.method} pattern={wildcards.pattern} out={output:q} 2>&1 | tee {log:q}"


rule export:
    input:
        [f"{R}/export/{m}/{p}/{s}" for m in METHODS for p in PATTERNS for s in ("prune1", "prune1_adjust")]
        + [f"{R}/{m}/{p}/{r}/sds" for m in METHODS for p in PATTERNS for r in RECONS],
