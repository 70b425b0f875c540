"""The perplexity protocol, pinned (../shared/docs/sds-method.md, as SparseGPT and Wanda compute it): the
test split's records joined with "\\n\\n", tokenized once, cut into ⌊T/seqlen⌋ non-overlapping windows
(the first 256 for C4), exp(mean token NLL). The evaluate stage must give the same number as a
straightforward independent computation, to 1e-4, on the embedded corpus and on real WikiText-2."""
import json
import math

import pytest
import torch

from conftest import SHARED_ASSETS, save_tiny_opt_folder
from sds.core.config import validate_config
from sds.demo.corpus import generate_corpus
from sds.data.texts import join_lines, read_text_source, tokenize
from sds.data.windows import perplexity_windows

WIKITEXT = SHARED_ASSETS / "wikitext-2-v1"


def independent_perplexity(model, tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> float:
    """One window at a time through the model with labels (Hugging Face's own shifted mean loss)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seqlen if max_windows is None else min(len(ids) // seqlen, max_windows)
    nll = 0.0
    with torch.no_grad():
        for i in range(n):
            window = torch.tensor([ids[i * seqlen:(i + 1) * seqlen]])
            nll += model(input_ids=window, labels=window).loss.item() * (seqlen - 1)
    return math.exp(nll / (n * (seqlen - 1)))


def summary_row_perplexity(run_dir, row: dict) -> float:
    """A row of results/summary.csv (the micro config: sparsegpt 2:4, reconstruction `default`, builtin
    corpus) recomputed independently of the pipeline's loading and evaluation code: the checkpoint through
    Hugging Face directly (pruned weights loaded as a state dict), the held-out split as the corpus stage
    wrote it, `evaluate.seqlen` 64 and `max_windows` 8 as micro.yaml sets them."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sds = run_dir / "sparsegpt" / "2of4" / "default" / "sds" / "model"
    folder = sds if row["stage"] == "sds" else run_dir / "model"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if row["stage"] in ("prune1", "prune1+adjust"):
        checkpoint = run_dir / "sparsegpt" / "2of4" / row["stage"].replace("+adjust", "_adjust")
        unexpected = model.load_state_dict(load_file(checkpoint / "weights.safetensors"), strict=False).unexpected_keys
        assert not unexpected, unexpected
    return independent_perplexity(model, tokenizer, (run_dir / "corpus" / "test.txt").read_text(), 64, 8)


def wikitext_rows_joined(path) -> str:
    """What `"\\n\\n".join(load_dataset("wikitext", ...)["text"])` gives: the loader yields each line of
    the file (newline kept) as a record, whitespace-only lines as ""."""
    with open(path, encoding="utf-8") as fh:
        return "\n\n".join(row if row.strip() else "" for row in fh)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random OPT + a BPE tokenizer trained on generated text, saved like the pipeline's model."""
    return save_tiny_opt_folder(tmp_path_factory.mktemp("ppl") / "model", documents=100, vocab=512, hidden=32, ffn=64)


def _stage_ppl(tmp_path, model_dir, datasets, corpus_dir=None, max_windows=None, seqlen=64):
    from sds.stages import evaluate as stages

    cfg = validate_config({"run": "t", "threads": 1, "mlflow": {"enabled": False},
                           "evaluate": {"seqlen": seqlen, "datasets": datasets, "max_windows": max_windows,
                                        "zeroshot": {"enabled": False}}})
    stages.evaluate(cfg, model_dir=str(model_dir), corpus_dir=corpus_dir, out=str(tmp_path / "e.json"))
    return json.loads((tmp_path / "e.json").read_text())


def _load(model_dir):
    from sds.model.loading import load_model

    return load_model(model_dir)


def test_embedded_corpus_ppl_matches_independent_computation(tmp_path, model_dir):
    (tmp_path / "corpus").mkdir()
    text = generate_corpus(15, 7)
    (tmp_path / "corpus" / "test.txt").write_text(text)
    out = _stage_ppl(tmp_path, model_dir, {"builtin": "builtin"}, corpus_dir=str(tmp_path / "corpus"))
    model, tok = _load(model_dir)
    expected = independent_perplexity(model, tok, text, 64)  # the built-in split is read as it is
    assert out["ppl"]["builtin"] == pytest.approx(expected, rel=1e-4)
    assert out["windows"]["builtin"] == len(tok(text, add_special_tokens=False)["input_ids"]) // 64
    assert "zeroshot" not in out
    again = _stage_ppl(tmp_path, model_dir, {"builtin": "builtin"}, corpus_dir=str(tmp_path / "corpus"))
    assert again["ppl"] == out["ppl"], "same model + same text → the same perplexity"


@pytest.mark.skipif(not (WIKITEXT / "test.txt").is_file(),
                    reason=f"real WikiText-2 not available ({WIKITEXT}/test.txt: ../shared/assets beside the checkout)")
def test_wikitext2_ppl_matches_independent_computation(tmp_path, model_dir):
    path = WIKITEXT / "test.txt"
    model, tok = _load(model_dir)
    text = wikitext_rows_joined(path)
    assert read_text_source(str(path)) == text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert perplexity_windows(tokenize(tok, read_text_source(str(path))), 64).shape == (len(ids) // 64, 64)
    # the stage on the first 256 windows of the whole split (1.2 MB, tokenized once), against the loop
    out = _stage_ppl(tmp_path, model_dir, {"wikitext2": str(path)}, max_windows=256)
    assert out["windows"]["wikitext2"] == 256 < len(ids) // 64
    assert out["ppl"]["wikitext2"] == pytest.approx(independent_perplexity(model, tok, text, 64, 256), rel=1e-4)


def test_local_text_jsonl_parquet_and_datasets_folder_work_offline(tmp_path, monkeypatch):
    import datasets
    import pandas as pd

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    raw = " \n = Title = \n \n First line .\n Second line .\n"
    rows = ["", " = Title = \n", "", " First line .\n", " Second line .\n"]  # as the WikiText loader yields
    expected = "\n\n".join(rows)
    (tmp_path / "t.txt").write_text(raw)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"body": r}) + "\n" for r in rows))
    pd.DataFrame({"text": rows}).to_parquet(tmp_path / "t.parquet")
    (tmp_path / "local_ds").mkdir()
    pd.DataFrame({"text": rows}).to_parquet(tmp_path / "local_ds" / "test.parquet")
    assert join_lines(raw) == expected
    assert read_text_source(str(tmp_path / "t.txt")) == expected
    assert read_text_source(str(tmp_path / "t.jsonl"), text_field="body") == expected
    assert read_text_source(str(tmp_path / "t.parquet")) == expected
    assert read_text_source(f"hf:{tmp_path / 'local_ds'}", split="test") == expected
    assert read_text_source("builtin", builtin_text=tmp_path / "t.txt") == raw  # our own corpus: as written
    from sds.core.errors import DataError

    with pytest.raises(DataError, match="local datasets cache"):  # offline: no download is attempted
        read_text_source("hf:wikitext:wikitext-2-raw-v1:test")


def test_windows_are_non_overlapping_and_the_cap_keeps_the_first():
    ids = torch.arange(1000)
    windows = perplexity_windows(ids, 64)
    assert windows.shape == (15, 64) and torch.equal(windows.flatten(), ids[:960])
    capped = perplexity_windows(ids, 64, 4)  # C4 convention: the first 256 windows (here 4)
    assert torch.equal(capped, windows[:4])
    assert perplexity_windows(ids, 64, 256).shape == (15, 64)
