# Perplexity, zero-shot accuracy and achieved sparsity of every checkpoint: dense, prune1, prune1+adjust, SDS.
from sds.tasksets import BUILTIN_TASKS, resolve_tasks  # noqa: E402

EVAL_DEPS = slice_of("threads", "device", "model.dtype", "evaluate")
CORPUS_ARG = f"corpus_dir={R}/corpus" if BUILTIN else ""
_ZS = RESOLVED["evaluate"]["zeroshot"]
ZS_TASKS = f"{R}/tasks" if _ZS["enabled"] and set(resolve_tasks(_ZS["tasks"])) & set(BUILTIN_TASKS) else []
TASKS_ARG = f"tasks_dir={ZS_TASKS}" if ZS_TASKS else ""


rule zeroshot_tasks:
    output:
        directory(f"{R}/tasks"),
    params:
        deps=slice_of("seed", "evaluate.zeroshot.builtin_items"),
    localrule: True
    log:
        f"{R}/logs/zeroshot_tasks.log",
    benchmark:
        f"{R}/benchmarks/zeroshot_tasks/zeroshot_tasks.tsv"
    shell:
        "{STAGE} zeroshot_tasks --config {CONFIG_JSON} out={output:q} 2>&1 | tee {log:q}"


rule evaluate_dense:
    input:
        model=MODEL_INPUT,
        corpus=f"{R}/corpus" if BUILTIN else [],
        texts=EVAL_TEXTS,
        tasks=ZS_TASKS,
    output:
        f"{R}/eval/dense.json",
    params:
        deps=EVAL_DEPS,
    threads: THREADS
    resources:
        **rule_resources("evaluate_dense"),
    log:
        f"{R}/logs/evaluate/dense.log",
    benchmark:
        f"{R}/benchmarks/evaluate/dense.tsv"
    shell:
        "{STAGE} evaluate --config {CONFIG_JSON} model_dir={MODEL:q} {CORPUS_ARG} {TASKS_ARG} stage=dense "
        "out={output:q} 2>&1 | tee {log:q}"


rule evaluate_prune1:
    input:
        model=MODEL_INPUT,
        corpus=f"{R}/corpus" if BUILTIN else [],
        texts=EVAL_TEXTS,
        ckpt=f"{R}/{{method}}/{{pattern}}/{{stage}}",
        tasks=ZS_TASKS,
    output:
        f"{R}/eval/{{method}}/{{pattern}}/{{stage}}.json",
    wildcard_constraints:
        stage="prune1|prune1_adjust",
    params:
        deps=EVAL_DEPS,
        label=lambda wc: "prune1+adjust" if wc.stage == "prune1_adjust" else "prune1",
    threads: THREADS
    resources:
        **rule_resources("evaluate_prune1"),
    log:
        f"{R}/logs/evaluate/{{method}}_{{pattern}}_{{stage}}.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{method}}_{{pattern}}_{{stage}}.tsv"
    shell:
        "{STAGE} evaluate --config {CONFIG_JSON} model_dir={MODEL:q} {CORPUS_ARG} {TASKS_ARG} "
        "weights={input.ckpt:q}/weights.safetensors stage={params.label} method={wildcards.method} "
        "pattern={wildcards.pattern} out={output:q} 2>&1 | tee {log:q}"


rule evaluate_sds:
    input:
        corpus=f"{R}/corpus" if BUILTIN else [],
        texts=EVAL_TEXTS,
        ckpt=f"{R}/{{method}}/{{pattern}}/{{recon}}/sds",
        tasks=ZS_TASKS,
    output:
        f"{R}/eval/{{method}}/{{pattern}}/{{recon}}/sds.json",
    params:
        deps=EVAL_DEPS,
    threads: THREADS
    resources:
        **rule_resources("evaluate_sds"),
    log:
        f"{R}/logs/evaluate/{{method}}_{{pattern}}_{{recon}}_sds.log",
    benchmark:
        f"{R}/benchmarks/evaluate/{{method}}_{{pattern}}_{{recon}}_sds.tsv"
    shell:
        "{STAGE} evaluate --config {CONFIG_JSON} model_dir={input.ckpt:q}/model {CORPUS_ARG} {TASKS_ARG} "
        "stage=sds method={wildcards.method} pattern={wildcards.pattern} recon={wildcards.recon} out={output:q} "
        "2>&1 | tee {log:q}"
