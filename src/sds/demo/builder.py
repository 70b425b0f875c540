"""Builds the embedded default model: a BPE tokenizer and a small causal LM (OPT or LLaMA architecture)
trained on a text corpus.

Everything is seeded and counted in optimiser steps (never wall time), so the same config gives the
same weights on the same hardware.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's order: bos-ish 0, pad 1, eos 2, unk 3


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on `text`, wrapped for `save_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = text.split("\n")
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=1_000_000)


def make_opt_config(tokenizer, layers: int, hidden: int, ffn: int, heads: int, max_positions: int):
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
        num_attention_heads=heads, max_position_embeddings=max_positions, word_embed_proj_dim=hidden,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, do_layer_norm_before=True, enable_bias=True,
    )


def make_llama_config(tokenizer, layers: int, hidden: int, ffn: int, heads: int, max_positions: int,
                      kv_heads: int | None = None):
    """A LLaMA-architecture config (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention when
    kv_heads < heads), the family of SmolLM2, Mistral and Qwen2."""
    from transformers import LlamaConfig

    if kv_heads is None:
        kv_heads = heads // 2 if heads % 2 == 0 else heads
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, attention_dropout=0.0,
    )


ARCHITECTURES = ("opt", "llama")


def train_causal_lm(model, token_ids: torch.Tensor, *, steps: int, batch_size: int, seqlen: int, lr: float,
                    seed: int, progress=None) -> list[float]:
    """Trains `model` in place on random windows of `token_ids`; returns the loss curve (one per 10 steps)."""
    gen = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up then cosine decay to 10%
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    curve, running = [], 0.0
    n_windows = token_ids.numel() - seqlen - 1
    start = time.monotonic()
    for step in range(steps):
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, n_windows, (batch_size,), generator=gen)
        batch = torch.stack([token_ids[s:s + seqlen] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        running += loss.item()
        if (step + 1) % 10 == 0:
            curve.append(running / 10)
            running = 0.0
            if progress is not None:
                progress(step + 1, steps, curve[-1], time.monotonic() - start)
    model.eval()
    return curve


def build_model(text: str, out_dir: Path, *, vocab_size: int, layers: int, hidden: int, ffn: int, heads: int,
                max_positions: int, steps: int, batch_size: int, seqlen: int, lr: float, seed: int,
                architecture: str = "opt", kv_heads: int | None = None, progress=None) -> dict:
    """Trains a tokenizer + causal LM of `architecture` on `text` and writes both into `out_dir` (a plain
    save_pretrained folder, loadable with AutoModelForCausalLM)."""
    from transformers import AutoModelForCausalLM

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}")
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(text, vocab_size)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if architecture == "opt":
        config = make_opt_config(tokenizer, layers, hidden, ffn, heads, max_positions)
    else:
        config = make_llama_config(tokenizer, layers, hidden, ffn, heads, max_positions, kv_heads)
    model = AutoModelForCausalLM.from_config(config)
    curve = train_causal_lm(model, ids, steps=steps, batch_size=batch_size, seqlen=seqlen, lr=lr, seed=seed,
                            progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"train_tokens": int(ids.numel()), "final_train_loss": curve[-1] if curve else float("nan"),
            "loss_curve": curve, "parameters": sum(p.numel() for p in model.parameters())}
