# Dense reconstruction: pruned weights re-activated, each linear re-fitted with a sparse regulariser.
# Every layer reads only the caches, so with `layer_parallel: true` each decoder layer is its own job
# ({layer} wildcard) and a gather rule merges them into the same checkpoint layout.

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
          prune1=L.prune1(),
      output:
          directory(L.reconstruct()),
      params:
          deps=keys_of("reconstruct"),
          dense_arg=recon_dense_arg,
      threads: THREADS
      resources:
          **rule_resources("reconstruct"),
      log:
          L.log("reconstruct", "{method}", "{pattern}", "{recon}"),
      benchmark:
          L.benchmark("reconstruct", "{method}", "{pattern}", "{recon}")
      shell:
          "{STAGE} reconstruct --config {CONFIG_JSON} model_dir={MODEL:q} inputs_dir={input.inputs:q} "
          "{params.dense_arg} prune1_dir={input.prune1:q} recon={wildcards.recon} out={output:q} 2>&1 | tee {log:q}"

else:

  rule reconstruct_layer:
      input:
          model=MODEL_INPUT,
          inputs=INPUTS,
          dense=recon_dense,
          prune1=L.prune1(),
      output:
          directory(L.reconstruct_layer()),
      wildcard_constraints:
          layer=r"\d+",
      params:
          deps=keys_of("reconstruct_one_layer"),
          dense_arg=recon_dense_arg,
      threads: THREADS
      resources:
          **rule_resources("reconstruct_layer", inherits="reconstruct"),
      log:
          L.log("reconstruct", "{method}", "{pattern}", "{recon}", "layer{layer}"),
      benchmark:
          L.benchmark("reconstruct_layer", "{method}", "{pattern}", "{recon}", "{layer}")
      shell:
          "{STAGE} reconstruct_one_layer --config {CONFIG_JSON} model_dir={MODEL:q} inputs_dir={input.inputs:q} "
          "{params.dense_arg} prune1_dir={input.prune1:q} recon={wildcards.recon} layer={wildcards.layer} out={output:q} "
          "2>&1 | tee {log:q}"

  rule reconstruct_gather:
      input:
          parts=lambda wc: [L.reconstruct_layer(wc.method, wc.pattern, wc.recon, i) for i in range(n_decoder_layers())],
      output:
          directory(L.reconstruct()),
      params:
          deps=keys_of("reconstruct_gather"),
          parts=lambda wc, input: " ".join(f"parts={p}" for p in input.parts),
      # a job too (it reads every layer's part and writes the whole checkpoint): without its own
      # resources it would run on the profile's defaults whatever the config says
      resources:
          **rule_resources("reconstruct_gather"),
      log:
          L.log("reconstruct", "{method}", "{pattern}", "{recon}", "gather"),
      benchmark:
          L.benchmark("reconstruct", "{method}", "{pattern}", "{recon}")
      shell:
          "{STAGE} reconstruct_gather --config {CONFIG_JSON} recon={wildcards.recon} {params.parts} out={output:q} "
          "2>&1 | tee {log:q}"
