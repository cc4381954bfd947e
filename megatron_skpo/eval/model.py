"""Resolve a ``--model`` argument to a Hugging Face model directory that vLLM can load.

Accepted: an HF directory (has ``config.json``) or a ``.gguf`` file (dequantised once into
``<cache_dir>/<name>-hf``). A Megatron checkpoint will be one more branch here, calling the
converter's ``to_hf`` once it exists; until then it is refused with a clear message.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def resolve_model(path: str | Path, cache_dir: Optional[str | Path] = None) -> Path:
    """HF directory for ``path`` (converted on the fly if needed)."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if p.is_file() and p.suffix == ".gguf":
        from checkpoint_convert.gguf import gguf_to_hf

        out = Path(cache_dir or p.parent) / f"{p.stem}-hf"
        if not (out / "model.safetensors").is_file():
            gguf_to_hf(p, out, "bfloat16")
        return out
    if p.is_dir() and any(p.glob("iter_*")) or (p / "latest_checkpointed_iteration.txt").is_file():
        raise NotImplementedError(f"--model {p}: Megatron checkpoints need the Megatron->HF converter "
                                  "(skpo-convert); convert to an HF directory first")
    raise FileNotFoundError(f"--model {p}: not an HF directory (config.json) or a .gguf file")
