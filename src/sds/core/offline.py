"""Nothing is downloaded at run time: the Hugging Face clients' offline mode (standard library only, so
config validation can set it without importing torch)."""
from __future__ import annotations

import os
import sys


def hub_offline() -> None:
    """Nothing is downloaded at run time: `datasets` and the Hub client read local files and caches only.
    Sets HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 unless the user set them, also in modules that have
    already read them at import."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hub = os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
    ds = os.environ["HF_DATASETS_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = hub
    if "datasets.config" in sys.modules:
        sys.modules["datasets.config"].HF_HUB_OFFLINE = ds
        sys.modules["datasets.config"].HF_DATASETS_OFFLINE = ds
