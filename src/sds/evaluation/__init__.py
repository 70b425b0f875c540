"""Evaluation: perplexity, achieved sparsity and N:M checks (`perplexity`), zero-shot accuracy (`zeroshot`)."""
