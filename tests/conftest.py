import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED_ASSETS = ROOT.parent / "shared" / "assets"

torch.set_num_threads(2)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


def correlated_inputs(n_tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated features and uneven scales, like real LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g) / dim ** 0.5
    scales = torch.logspace(-1, 1, dim)
    latent = torch.randn(n_tokens, dim, generator=g)
    return (latent @ mixing + 0.3 * torch.randn(n_tokens, dim, generator=g)) * scales


def tiny_opt(layers=2, hidden=32, ffn=64, heads=2, vocab=128, positions=64):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
                    num_attention_heads=heads, max_position_embeddings=positions, word_embed_proj_dim=hidden,
                    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return OPTForCausalLM(cfg).eval()


def tiny_llama(layers=2, hidden=32, ffn=64, heads=4, vocab=128, positions=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn,
                      num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=positions)
    return LlamaForCausalLM(cfg).eval()
