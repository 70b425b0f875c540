# The report: Markdown + CSV tables, seconds per stage, plots; merged into results/summary.csv.

ONE_SHOT = ("prune1", "prune1_adjust")
EVALS = [L.evaluation()] + [L.evaluation(m, p, s) for m in METHODS for p in PATTERNS for s in ONE_SHOT]
EVALS += [L.evaluation(m, p, "sds", r) for m in METHODS for p in PATTERNS for r in RECONS]
# Every checkpoint folder (its layers.json: per-linear errors, densities and weight range by stage), the
# dense reconstructions too (once per distinct dense phase): whether the dense phase is dense is the report's
# question, and the first method and pattern's are drawn in the weight histograms.
CKPTS = [L.checkpoint(m, p, s) for m in METHODS for p in PATTERNS for s in ONE_SHOT]
CKPTS += [L.sds(m, p, r) for m in METHODS for p in PATTERNS for r in RECONS]
CKPTS += [L.reconstruct(m, p, r) for m in METHODS for p in PATTERNS for r in dict.fromkeys(RECON_SOURCE.values())]

DENSE_NEEDED = ADJUST_NEEDS_DENSE or any(recon_needs_dense(r) for r in RECONS)
BENCHMARKS = [L.benchmark(s) for s in (["corpus", "build_model"] if BUILTIN else []) + ["calibration", "layer_inputs"]
              + (["activations"] if DENSE_NEEDED else [])]
BENCHMARKS += [L.benchmark(s, m, p) for s in ONE_SHOT for m in METHODS for p in PATTERNS]
BENCHMARKS += [L.benchmark("reconstruct", m, p, r) for m in METHODS for p in PATTERNS
               for r in dict.fromkeys(RECON_SOURCE.values())]
BENCHMARKS += [L.benchmark("prune2", m, p, r) for m in METHODS for p in PATTERNS for r in RECONS]
BENCHMARKS += [L.benchmark("evaluate", "dense")] + [L.benchmark("evaluate", m, p, s) for m in METHODS for p in PATTERNS
                                                    for s in ONE_SHOT]
BENCHMARKS += [L.benchmark("evaluate", m, p, r, "sds") for m in METHODS for p in PATTERNS for r in RECONS]
BENCHMARKS += [L.benchmark("zeroshot_tasks")] if ZS_TASKS else []


rule report:
    input:
        evals=EVALS,
        checkpoints=CKPTS,
    output:
        report=L.report_md,
        table=L.report_table,
        zeroshot=L.report_zeroshot,
    params:
        deps=keys_of("report"),
        evals=lambda wc, input: " ".join(f"evals={e}" for e in input.evals),
        ckpts=lambda wc, input: " ".join(f"checkpoints={c}" for c in input.checkpoints),
        benchmarks=lambda wc: " ".join(f"benchmarks={b}" for b in BENCHMARKS),
    log:
        L.log("report"),
    benchmark:
        L.benchmark("report")
    shell:
        "{STAGE} report --config {CONFIG_JSON} {params.evals} {params.ckpts} {params.benchmarks} "
        "model_dir={MODEL:q} out={L.report_dir} summary_csv={SUMMARY_CSV} 2>&1 | tee {log:q}"
