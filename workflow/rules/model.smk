# The embedded default model: a generated corpus, then a tokenizer + small OPT or LLaMA trained on it.

_CORPUS = RESOLVED["model"]["builtin"]["corpus"]


rule corpus:
    input:
        texts=[_CORPUS["train_path"], _CORPUS["test_path"]] if BUILTIN and _CORPUS["source"] == "text" else [],
    output:
        directory(L.corpus),
    params:
        deps=keys_of("corpus"),
    log:
        L.log("corpus"),
    benchmark:
        L.benchmark("corpus")
    shell:
        "{STAGE} corpus --config {CONFIG_JSON} out={output:q} 2>&1 | tee {log:q}"


rule build_model:
    input:
        corpus=L.corpus,
    output:
        directory(L.model),
    params:
        deps=keys_of("build_model"),
    threads: RESOLVED["model"]["builtin"]["threads"]
    resources:
        **rule_resources("build_model"),
    log:
        L.log("build_model"),
    benchmark:
        L.benchmark("build_model")
    shell:
        "{STAGE} build_model --config {CONFIG_JSON} corpus_dir={input.corpus:q} out={output:q} 2>&1 | tee {log:q}"
