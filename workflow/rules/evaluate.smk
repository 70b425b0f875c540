# Perplexity and achieved sparsity of every checkpoint: dense, prune1, prune1+adjust, SDS.

EVAL_DEPS = slice_of("threads", "device", "model.dtype", "evaluate")
CORPUS_ARG = f"corpus_dir={R}/corpus" if BUILTIN else ""


rule evaluate_dense:
    input:
        model=MODEL if BUILTIN else [],
        corpus=f"{R}/corpus" if BUILTIN else [],
    output:
        f"{R}/eval/dense.json",
    params:
        deps=EVAL_DEPS,
    threads: THREADS
    log:
        f"{R}/logs/evaluate/dense.log",
    benchmark:
        f"{R}/benchmarks/evaluate/dense.tsv"
    shell:
        "{STAGE} evaluate --config {CONFIG_JSON} model_dir={MODEL:q} {CORPUS_ARG} stage=dense out={output:q} "
        "2>&1 | tee {log:q}"


rule evaluate_prune1:
    input:
        model=MODEL if BUILTIN else [],
        corpus=f"{R}/corpus" if BUILTIN else [],
        ckpt=f"{R}/{{method}}/{{pattern}}/{{stage}}",
    output:
        f"{R}/eval/{{method}}/{{pattern}}/{{stage}}.json",
    wildcard_constraints:
        stage="prune1|prune1_adjust",
    params:
        deps=EVAL_DEPS,
        label=lambda wc: "prune1+adjust" if wc.stage == "prune1_adjust" else "prune1",
    threads: THREADS
    log:
        f"{R}/logs/evaluate/{{method}}_{{pattern}}_{{stage}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{method}}_{{pattern}}_{{stage}}.tsv"
    shell:
        "{STAGE} evaluate --config {CONFIG_JSON} model_dir={MODEL:q} {CORPUS_ARG} "
        "weights={input.ckpt:q}/weights.safetensors stage={params.label} method={wildcards.method} "
        "pattern={wildcards.pattern} out={output:q} 2>&1 | tee {log:q}"


rule evaluate_sds:
    input:
        corpus=f"{R}/corpus" if BUILTIN else [],
        ckpt=f"{R}/{{method}}/{{pattern}}/{{recon}}/sds",
    output:
        f"{R}/eval/{{method}}/{{pattern}}/{{recon}}/sds.json",
    params:
        deps=EVAL_DEPS,
    threads: THREADS
    log:
        f"{R}/logs/evaluate/{{method}}_{{pattern}}_{{recon}}_sds.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{method}}_{{pattern}}_{{recon}}_sds.tsv"
    shell:
        "{STAGE} evaluate --config {CONFIG_JSON} model_dir={input.ckpt:q}/model {CORPUS_ARG} stage=sds "
        "method={wildcards.method} pattern={wildcards.pattern} recon={wildcards.recon} out={output:q} "
        "2>&1 | tee {log:q}"
