"""Drawing the run's own figures from plain data: seconds per stage, in the pipeline's order, and the weight
histograms of one linear by stage (each curve labelled with its count of non-zero weights)."""
from __future__ import annotations

from matplotlib.figure import Figure

from .plots import FONT, new_figure

# The pipeline's stages in the order they run (benchmark folder names): the seconds chart and table follow
# it; a stage it does not name follows them, by name.
PIPELINE_ORDER = ["corpus", "build_model", "calibration", "layer_inputs", "activations", "prune1", "prune1_adjust",
                  "reconstruct_layer", "reconstruct", "reconstruct_gather", "prune2", "zeroshot_tasks", "evaluate",
                  "export", "report"]
_RANK = {name: i for i, name in enumerate(PIPELINE_ORDER)}


def stage_rank(stage: str) -> tuple[int, str]:
    """The sort key of a benchmark stage: its place in the pipeline, then its name."""
    return _RANK.get(stage, len(_RANK)), stage


# evaluation jobs (benchmark names <method>_<pattern>[_<setting>]_<checkpoint>) in the order their checkpoints
# are made
_EVALUATED = ("prune1", "prune1_adjust", "sds")


def job_order(jobs) -> list[str]:
    """'stage/job' keys in pipeline order; within `evaluate` the dense model first, then the one-shot, the
    one-shot + adjust and the SDS checkpoints' evaluations; otherwise by name."""
    def key(k: str):
        stage, job = k.split("/", 1)
        made = [i for i, c in enumerate(_EVALUATED) if job.endswith(f"_{c}")] if stage == "evaluate" else []
        return (*stage_rank(stage), job != "dense", made[-1] if made else len(_EVALUATED), job)

    return sorted(jobs, key=key)


def seconds_figure(seconds: dict[str, float]) -> Figure | None:
    """One horizontal bar per pipeline stage, top to bottom in the order the stages run: its jobs' benchmark
    wall seconds summed (stage-seconds, so jobs that ran side by side count in full)."""
    if not seconds:
        return None
    per_stage: dict[str, list[float]] = {}
    for key in job_order(seconds):
        per_stage.setdefault(key.split("/", 1)[0], []).append(seconds[key])
    stages = list(per_stage)  # job_order's: the pipeline's
    totals = [sum(per_stage[s]) for s in stages]
    fig = new_figure(6.5, 0.3 * len(stages) + 1.2)
    ax = fig.add_subplot()
    bars = ax.barh(range(len(stages)), totals, height=0.7, color="#4c72b0")
    for patch, stage in zip(bars.patches, stages):
        patch.set_gid(stage)
    ax.bar_label(bars, labels=[f"{t:.1f} s" + (f" · {len(per_stage[s])} jobs" if len(per_stage[s]) > 1 else "")
                               for s, t in zip(stages, totals)], padding=3, fontsize=7)
    ax.set_yticks(range(len(stages)), stages, fontsize=FONT)
    ax.set_ylim(len(stages) - 0.5, -0.5)
    ax.margins(x=0.25)
    ax.set_xlim(left=0)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", color="#e5e5e5", lw=0.6)
    ax.set_axisbelow(True)
    ax.set_xlabel("seconds (each job's measured time, summed over the stage's jobs)", fontsize=FONT)
    ax.set_title(f"Seconds per stage, in pipeline order (total {sum(totals):.1f} stage-seconds)", fontsize=FONT + 2)
    return fig


def histogram_figure(series: list[tuple[str, object, int]], weight_name: str) -> Figure:
    """Step histograms of log10 |w| over the non-zero weights, one per (stage name, numpy values, number of
    weights); each legend entry states its curve's non-zero count."""
    import numpy as np

    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    finite = [v for _, v, _ in series if len(v)]
    # one set of bin edges for every stage, so the counts compare bar for bar
    edges = np.linspace(min(float(v.min()) for v in finite), max(float(v.max()) for v in finite), 81) \
        if finite else 80
    for name, log_values, total in series:
        ax.hist(log_values, bins=edges, histtype="step", label=f"{name}: {len(log_values):,} of {total:,} non-zero")
    ax.set_xlabel(f"log10 |w|  ({weight_name})", fontsize=FONT)
    ax.set_ylabel("count (non-zero weights)", fontsize=FONT)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=FONT)
    ax.set_title("Weight magnitudes by stage", fontsize=FONT + 2)
    return fig
