# Dense reconstruction: pruned weights re-activated, each linear re-fitted with a sparse regulariser.
# Every layer reads only the caches, so with `layer_parallel: true` each decoder layer is its own job
# ({layer} wildcard) and a gather rule merges them into the same checkpoint layout.

RECON_DEPS = lambda wc: json.dumps({"settings": json.loads(_dense_phase(wc.recon)), "threads": THREADS,
                                    "dtype": RESOLVED["model"]["dtype"],
                                    "forward_batch": RESOLVED["forward_batch"]}, sort_keys=True)


def recon_dense(wildcards):
    """The dense activation cache, for the settings that run the dense layer on cached streams."""
    return [DENSE] if recon_needs_dense(wildcards.recon) else []


def recon_dense_arg(wildcards):
    return f"dense_dir={DENSE}" if recon_needs_dense(wildcards.recon) else ""


def n_decoder_layers():
    if BUILTIN:
        return RESOLVED["model"]["builtin"]["layers"]
    return json.loads((Path(MODEL) / "config.json").read_text())["num_hidden_layers"]


if not RESOLVED["layer_parallel"]:

  rule reconstruct:
      input:
          model=MODEL_INPUT,
          inputs=INPUTS,
          dense=recon_dense,
          prune1=f"{R}/{{method}}/{{pattern}}/prune1",
      output:
          directory(f"{R}/{{method}}/{{pattern}}/{{recon}}/reconstruct"),
      params:
          deps=RECON_DEPS,
          dense_arg=recon_dense_arg,
      threads: THREADS
      resources:
          **rule_resources("reconstruct"),
      log:
          f"{R}/logs/reconstruct/{{method}}_{{pattern}}_{{recon}}.log",
      benchmark:
          f"{R}/benchmarks/reconstruct/{{method}}_{{pattern}}_{{recon}}.tsv"
      shell:
          "{STAGE} reconstruct --config {CONFIG_JSON} model_dir={MODEL:q} inputs_dir={input.inputs:q} "
          "{params.dense_arg} prune1_dir={input.prune1:q} recon={wildcards.recon} out={output:q} 2>&1 | tee {log:q}"

else:

  rule reconstruct_layer:
      input:
          model=MODEL_INPUT,
          inputs=INPUTS,
          dense=recon_dense,
          prune1=f"{R}/{{method}}/{{pattern}}/prune1",
      output:
          directory(f"{R}/{{method}}/{{pattern}}/{{recon}}/reconstruct_layers/{{layer}}"),
      wildcard_constraints:
          layer=r"\d+",
      params:
          deps=RECON_DEPS,
          dense_arg=recon_dense_arg,
      threads: THREADS
      resources:
          **rule_resources("reconstruct"),
      log:
          f"{R}/logs/reconstruct/{{method}}_{{pattern}}_{{recon}}_layer{{layer}}.log",
      benchmark:
          f"{R}/benchmarks/reconstruct_layer/{{method}}_{{pattern}}_{{recon}}_{{layer}}.tsv"
      shell:
          "{STAGE} reconstruct_one_layer --config {CONFIG_JSON} model_dir={MODEL:q} inputs_dir={input.inputs:q} "
          "{params.dense_arg} prune1_dir={input.prune1:q} recon={wildcards.recon} layer={wildcards.layer} out={output:q} "
          "2>&1 | tee {log:q}"

  rule reconstruct_gather:
      input:
          parts=lambda wc: [f"{R}/{wc.method}/{wc.pattern}/{wc.recon}/reconstruct_layers/{i}"
                            for i in range(n_decoder_layers())],
      output:
          directory(f"{R}/{{method}}/{{pattern}}/{{recon}}/reconstruct"),
      params:
          parts=lambda wc, input: " ".join(f"parts={p}" for p in input.parts),
      log:
          f"{R}/logs/reconstruct/{{method}}_{{pattern}}_{{recon}}_gather.log",
      benchmark:
          f"{R}/benchmarks/reconstruct/{{method}}_{{pattern}}_{{recon}}.tsv"
      shell:
          "{STAGE} reconstruct_gather --config {CONFIG_JSON} recon={wildcards.recon} {params.parts} out={output:q} "
          "2>&1 | tee {log:q}"
