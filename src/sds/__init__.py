"""sds: Sparse-Dense-Sparse pruning of pre-trained language models, as a cached Snakemake pipeline."""
__version__ = "0.1.0"
