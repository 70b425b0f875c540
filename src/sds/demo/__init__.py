"""The built-in demo: a generated corpus, the small OPT/LLaMA model trained on it, its generated zero-shot tasks."""
