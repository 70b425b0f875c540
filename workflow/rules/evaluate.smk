# Perplexity, zero-shot accuracy and achieved sparsity of every checkpoint: dense, prune1, prune1+adjust, SDS.
from sds.core.tasksets import BUILTIN_TASKS, resolve_tasks  # noqa: E402

CORPUS = L.corpus if BUILTIN else []
CORPUS_ARG = f"corpus_dir={L.corpus}" if BUILTIN else ""
_ZS = RESOLVED["evaluate"]["zeroshot"]
ZS_TASKS = L.tasks if _ZS["enabled"] and set(resolve_tasks(_ZS["tasks"], _ZS["source"])) & set(BUILTIN_TASKS) else []
TASKS_ARG = f"tasks_dir={ZS_TASKS}" if ZS_TASKS else ""


rule zeroshot_tasks:
    output:
        directory(L.tasks),
    params:
        deps=keys_of("zeroshot_tasks"),
    localrule: True
    log:
        L.log("zeroshot_tasks"),
    benchmark:
        L.benchmark("zeroshot_tasks")
    shell:
        "{STAGE} zeroshot_tasks --config {CONFIG_JSON} out={output:q} 2>&1 | tee {log:q}"


rule evaluate_dense:
    input:
        model=MODEL_INPUT,
        corpus=CORPUS,
        texts=EVAL_TEXTS,
        tasks=ZS_TASKS,
    output:
        L.evaluation(),
    params:
        deps=keys_of("evaluate"),
    threads: THREADS
    resources:
        **rule_resources("evaluate_dense"),
    log:
        L.log("evaluate", "dense"),
    benchmark:
        L.benchmark("evaluate", "dense")
    shell:
        "{STAGE} evaluate --config {CONFIG_JSON} model_dir={MODEL:q} {CORPUS_ARG} {TASKS_ARG} stage=dense "
        "out={output:q} 2>&1 | tee {log:q}"


rule evaluate_prune1:
    input:
        model=MODEL_INPUT,
        corpus=CORPUS,
        texts=EVAL_TEXTS,
        ckpt=L.checkpoint(),
        tasks=ZS_TASKS,
    output:
        L.evaluation("{method}", "{pattern}", "{stage}"),
    wildcard_constraints:
        stage="prune1|prune1_adjust",
    params:
        deps=keys_of("evaluate"),
        label=lambda wc: "prune1+adjust" if wc.stage == "prune1_adjust" else "prune1",
    threads: THREADS
    resources:
        **rule_resources("evaluate_prune1"),
    log:
        L.log("evaluate", "{method}", "{pattern}", "{stage}"),
    benchmark:
        L.benchmark("evaluate", "{method}", "{pattern}", "{stage}")
    shell:
        "{STAGE} evaluate --config {CONFIG_JSON} model_dir={MODEL:q} {CORPUS_ARG} {TASKS_ARG} "
        "weights={input.ckpt:q}/weights.safetensors stage={params.label} method={wildcards.method} "
        "pattern={wildcards.pattern} out={output:q} 2>&1 | tee {log:q}"


rule evaluate_sds:
    input:
        corpus=CORPUS,
        texts=EVAL_TEXTS,
        ckpt=L.sds(),
        tasks=ZS_TASKS,
    output:
        L.evaluation("{method}", "{pattern}", "sds", "{recon}"),
    params:
        deps=keys_of("evaluate"),
    threads: THREADS
    resources:
        **rule_resources("evaluate_sds"),
    log:
        L.log("evaluate", "{method}", "{pattern}", "{recon}", "sds"),
    benchmark:
        L.benchmark("evaluate", "{method}", "{pattern}", "{recon}", "sds")
    shell:
        "{STAGE} evaluate --config {CONFIG_JSON} model_dir={input.ckpt:q}/model {CORPUS_ARG} {TASKS_ARG} "
        "stage=sds method={wildcards.method} pattern={wildcards.pattern} recon={wildcards.recon} out={output:q} "
        "2>&1 | tee {log:q}"
