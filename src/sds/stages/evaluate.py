"""The closing stages: exporting a checkpoint as a loadable folder, evaluation (perplexity, zero-shot
accuracy, achieved sparsity) and the report; lm-eval, MLflow and plotting are imported inside the stages
that use them."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from ..core.config import config_hash
from ..core.errors import CorruptFileError
from ..core.layout import LAYERS, MASKS, MODEL, WEIGHTS, RunLayout
from ..core.patterns import pattern_from_slug
from ..core.runtime import provenance, setup
from ..core.stage_keys import resolved_config
from ..model.checkpoints import checkpoint_sparsity, write_model_folder
from ..report.modelcard import model_card
from ..storage.atomic import atomic_dir
from ..storage.checksums import checksum_folder
from ..storage.documents import read_json, write_json
from ..tracking.stage_runs import track_stage
from .common import checkpoint_readers, layerwise_model

log = logging.getLogger("sds")


def export(config: dict, model_dir: str, checkpoint: str, stage: str, method: str, pattern: str, out: str) -> None:
    """A first-prune or prune1+adjust checkpoint as a loadable Hugging Face folder `out`/model with its
    model card, and its masks beside (`out`/masks.safetensors): the layout of the SDS output, so any row
    of the report can be shipped."""
    import shutil

    from ..tracking.entries import model_entry, registered_name, shown

    started = time.time()
    lm = layerwise_model(config, model_dir, "cpu")
    weights, _ = checkpoint_readers(checkpoint, "cpu", masks=False)
    summary = read_json(Path(checkpoint) / LAYERS)
    sparsity = checkpoint_sparsity(lm, weights)
    with atomic_dir(out) as tmp:
        for name in (MASKS, LAYERS):
            shutil.copyfile(Path(checkpoint) / name, tmp / name)
        checksum_folder(tmp)
        write_model_folder(lm, Path(checkpoint) / WEIGHTS, tmp / MODEL,
                           model_card(config, stage, method, pattern_from_slug(pattern), sparsity, summary,
                                      lm.folder))
    log.info("exported %s %s %s to %s", stage, method, pattern, out)
    # its perplexity, if this checkpoint's evaluation ran
    evaluation = Path(RunLayout(config["run"]).evaluation(method, pattern, stage))
    ppl = {}
    if evaluation.is_file():
        try:
            ppl = {f"ppl.{k}": shown(v) for k, v in read_json(evaluation, verify=True)["ppl"].items()}
        except CorruptFileError as exc:  # only a tag of the registered model: the export itself stands
            log.warning("the registered model carries no perplexity: %s", exc)
    tags = {"method": method, "pattern": str(pattern_from_slug(pattern)), "stage": stage,
            "sparsity": shown(sparsity["overall"]), **ppl}
    track_stage(config, f"export/{method}/{pattern}/{stage}", started=started, metrics={"sparsity": sparsity["overall"]},
                tags={"sds_method": method, "sds_pattern": pattern},
                model=model_entry(registered_name(config["run"], method, pattern, stage), Path(out) / MODEL, tags))


def whole_model_budget(device) -> int:
    """Bytes of weights evaluation loads whole on `device` (for lm-eval): 80 % of a GPU's total memory,
    half the host's on the CPU; a larger model is placed by accelerate, the rest offloaded to disk.
    Measured sizes, not free memory: the same config takes the same path on the same hardware."""
    import torch

    from ..model.streams import host_memory_bytes

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.8)
    return host_memory_bytes() // 2


def evaluate(config: dict, model_dir: str, out: str, corpus_dir: str | None = None, weights: str | None = None,
             stage: str = "dense", method: str = "", pattern: str = "", recon: str = "",
             tasks_dir: str | None = None) -> None:
    """Perplexity on every configured dataset, zero-shot accuracy (lm-eval-harness) and the achieved
    sparsity of one checkpoint: the model folder `model_dir`, with the decoder linears of `weights` (a
    first-prune checkpoint's) where given. Perplexity runs one decoder layer at a time whatever the
    model's size; zero-shot needs the model whole (see whole_model_budget). `tasks_dir`: the built-in tasks'
    data (the zeroshot_tasks step's output)."""
    from ..evaluation.perplexity import evaluate_layerwise, zeroshot_scores
    from ..model.loading import load_tokenizer, whole_model
    from ..storage.atomic import scratch_dir
    from ..storage.safetensors import TensorReader
    from ..tracking.entries import evaluated_model_entry, headline_metrics, shown, text_input

    started = time.time()
    zs = config["evaluate"]["zeroshot"]
    zs_tasks = None
    if zs["enabled"]:  # every task's data file or cached dataset is checked before anything is loaded
        from ..core.tasksets import check_task_data

        zs_names, zs_files = check_task_data(zs, tasks_dir)
    label = "/".join(x for x in (method, pattern, recon, stage) if x)
    result = {"stage": stage, "method": method, "pattern": str(pattern_from_slug(pattern)) if pattern else "",
              "recon": recon}
    start = time.monotonic()
    with scratch_dir(out) as work:
        if zs["enabled"]:  # the tasks with their data (lm_eval), still before the model
            from ..evaluation.zeroshot import load_tasks, quiet_progress_bars

            zs_tasks = load_tasks(zs_names, zs_files, work / "zeroshot-data")
        device = setup(config)
        lm = layerwise_model(config, model_dir, device)
        trust = config["model"]["trust_remote_code"]
        tokenizer = load_tokenizer(lm.folder, trust_remote_code=trust)
        # every tensor is read once: verified as it is read (not hashed whole first, then read)
        reader = TensorReader(weights, device=device, verify="per_tensor") if weights else None
        scores, texts = evaluate_layerwise(
            lm, tokenizer, config, label=label, weights=reader, pattern=pattern_from_slug(pattern) if pattern else None,
            corpus_dir=corpus_dir, work_dir=work)
        if zs_tasks:
            with quiet_progress_bars():  # transformers' bar while a sharded model loads
                model = whole_model(lm, weights_file=Path(weights) if weights else None,
                                    budget=whole_model_budget(device), work_dir=work, trust_remote_code=trust)
            scores["zeroshot"] = zeroshot_scores(model, tokenizer, config, zs_tasks, label=label)
            del model
    result.update(scores)
    result["seconds"] = time.monotonic() - start
    result["config_hash"], result["provenance"] = config_hash(resolved_config(config)), provenance()
    write_json(out, result, output=True)
    zs_metrics = {}
    if "zeroshot" in result:
        from ..evaluation.zeroshot import flat_metrics

        zs_metrics = {k: shown(v) for k, v in flat_metrics(result["zeroshot"]).items()}
    headline = headline_metrics(result)
    sds_model = evaluated_model_entry(config["run"], result, model_dir) if stage == "sds" else None
    ev = config["evaluate"]
    inputs = [text_input(*t.pop("args"), seqlen=ev["seqlen"], max_windows=ev["max_windows"], **t) for t in texts]
    track_stage(config, f"evaluate/{label}", started=started, params={"label": label},
                metrics={**{f"ppl.{k}": shown(v) for k, v in result["ppl"].items()}, "sparsity": shown(result["sparsity"]),
                         **zs_metrics},
                parent_metrics=headline, inputs=inputs, model=sds_model,
                tags={"sds_method": method, "sds_pattern": pattern, "sds_recon": recon, "sds_checkpoint": stage})


def report(config: dict, evals: list[str], out: str, summary_csv: str, model_dir: str,
           benchmarks: list[str] = (), checkpoints: list[str] = ()) -> None:
    from ..report.inputs import read_evals
    from ..report.report import build_report
    from ..tracking.entries import headline_metrics

    started = time.time()
    artifacts = build_report(config, evals, list(benchmarks), Path(out), Path(summary_csv), model_dir, list(checkpoints))
    results = read_evals(evals)
    numbers = {k: v for r in results for k, v in headline_metrics(r).items()}
    # on the pipeline's run too: checkpoints whose evaluation Snakemake kept from an earlier config logged
    # their numbers to that config's run only
    track_stage(config, "report", started=started, parent_artifacts=artifacts, artifacts=artifacts, parent_metrics=numbers,
                metrics={"checkpoints": len(results), "rows": sum(len(r["ppl"]) for r in results), **numbers})
