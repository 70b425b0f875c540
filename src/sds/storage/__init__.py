"""Storage: files of stage outputs, written atomically, checksummed, owned; safetensors and Parquet."""
