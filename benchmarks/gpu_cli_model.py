"""A small model for running the CLI end to end on a GPU machine, whose image has neither gguf nor
mistral_common: 4 layers of random weights (hidden 256, 2/1 heads of 128, FFN 768) with Mistral's v1
tokenizer, written as a Q4_0 GGUF and converted as stored (int4), ~30 MB. Make it here, carry the folder
(`carry: [".gpu_model"]`, the folder ignored by git) and run `bash benchmarks/gpu_check.sh cli` there.

    python -m benchmarks.gpu_cli_model [.gpu_model]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from benchmarks.compare_llamacpp import mistral_width_gguf
from lilmistral.convert import convert


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu_model")
    with tempfile.TemporaryDirectory() as tmp:
        gguf = mistral_width_gguf(Path(tmp) / "small.gguf", layers=4, dim=256, hidden=768, heads=2, kv=1)
        print(convert(gguf, out, "int4", overwrite=True))


if __name__ == "__main__":
    main()
