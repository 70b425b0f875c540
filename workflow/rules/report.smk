# The report: Markdown + CSV tables, seconds per stage, plots; merged into results/summary.csv.

EVALS = [f"{R}/eval/dense.json"] + [
    f"{R}/eval/{m}/{p}/{s}.json" for m in METHODS for p in PATTERNS for s in ("prune1", "prune1_adjust")
] + [f"{R}/eval/{m}/{p}/{r}/sds.json" for m in METHODS for p in PATTERNS for r in RECONS]
# Every sparse checkpoint folder (its layers.json: per-linear errors by stage), and the first method and
# pattern's dense reconstruction (for the weight histograms, drawn for the first folder's method and pattern).
CKPTS = [f"{R}/{m}/{p}/{s}" for m in METHODS for p in PATTERNS for s in ("prune1", "prune1_adjust")]
CKPTS += [f"{R}/{m}/{p}/{r}/sds" for m in METHODS for p in PATTERNS for r in RECONS]
CKPTS += [f"{R}/{METHODS[0]}/{PATTERNS[0]}/{RECON_SOURCE[RECONS[0]]}/reconstruct"]

_B = f"{R}/benchmarks"
DENSE_NEEDED = ADJUST_NEEDS_DENSE or any(recon_needs_dense(r) for r in RECONS)
BENCHMARKS = [f"{_B}/{s}/{s}.tsv" for s in (["corpus", "build_model"] if BUILTIN else []) + ["calibration", "layer_inputs"]
              + (["activations"] if DENSE_NEEDED else [])]
BENCHMARKS += [f"{_B}/{s}/{m}_{p}.tsv" for s in ("prune1", "prune1_adjust") for m in METHODS for p in PATTERNS]
BENCHMARKS += [f"{_B}/reconstruct/{m}_{p}_{r}.tsv" for m in METHODS for p in PATTERNS for r in dict.fromkeys(RECON_SOURCE.values())]
BENCHMARKS += [f"{_B}/prune2/{m}_{p}_{r}.tsv" for m in METHODS for p in PATTERNS for r in RECONS]
BENCHMARKS += [f"{_B}/evaluate/dense.tsv"] + [f"{_B}/evaluate/{m}_{p}_{s}.tsv" for m in METHODS for p in PATTERNS
                                              for s in ("prune1", "prune1_adjust")]
BENCHMARKS += [f"{_B}/evaluate/{m}_{p}_{r}_sds.tsv" for m in METHODS for p in PATTERNS for r in RECONS]
BENCHMARKS += [f"{_B}/zeroshot_tasks/zeroshot_tasks.tsv"] if ZS_TASKS else []


rule report:
    input:
        evals=EVALS,
        checkpoints=CKPTS,
    output:
        report=f"{R}/report/report.md",
        table=f"{R}/report/table.csv",
        zeroshot=f"{R}/report/zeroshot.csv",
    params:
        deps=slice_of("report", "evaluate.datasets"),
        evals=lambda wc, input: " ".join(f"evals={e}" for e in input.evals),
        ckpts=lambda wc, input: " ".join(f"checkpoints={c}" for c in input.checkpoints),
        benchmarks=lambda wc: " ".join(f"benchmarks={b}" for b in BENCHMARKS),
    log:
        f"{R}/logs/report.log",
    benchmark:
        f"{R}/benchmarks/report/report.tsv"
    shell:
        "{STAGE} report --config {CONFIG_JSON} {params.evals} {params.ckpts} {params.benchmarks} "
        "model_dir={MODEL:q} out={R}/report summary_csv=results/summary.csv 2>&1 | tee {log:q}"
