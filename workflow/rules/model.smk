# The embedded default model: a generated corpus, then a tokenizer + small OPT or LLaMA trained on it.

_CORPUS = RESOLVED["model"]["builtin"]["corpus"]


rule corpus:
    input:
        texts=[_CORPUS["train_path"], _CORPUS["test_path"]] if BUILTIN and _CORPUS["source"] == "text" else [],
    output:
        directory(f"{R}/corpus"),
    params:
        deps=slice_of("seed", "model.builtin.corpus"),
    log:
        f"{R}/logs/corpus.log",
    benchmark:
        f"{R}/benchmarks/corpus/corpus.tsv"
    shell:
        "{STAGE} corpus --config {CONFIG_JSON} out={output:q} 2>&1 | tee {log:q}"


rule build_model:
    input:
        corpus=f"{R}/corpus",
    output:
        directory(f"{R}/model"),
    params:
        deps=slice_of("seed", "model.builtin"),
    threads: RESOLVED["model"]["builtin"]["threads"]
    resources:
        **rule_resources("build_model"),
    log:
        f"{R}/logs/build_model.log",
    benchmark:
        f"{R}/benchmarks/build_model/build_model.tsv"
    shell:
        "{STAGE} build_model --config {CONFIG_JSON} corpus_dir={input.corpus:q} out={output:q} 2>&1 | tee {log:q}"
