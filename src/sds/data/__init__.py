"""Data: text sources and tokenisation (`texts`), calibration and perplexity windows (`windows`)."""
