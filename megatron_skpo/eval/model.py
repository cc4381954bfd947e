"""Resolve a ``--model`` argument to a Hugging Face model directory that vLLM can load.

Accepted: an HF directory (has ``config.json``), a ``.gguf`` file (dequantised once into
``<cache_dir>/<name>-hf``), or a Megatron checkpoint: a root (``latest_checkpointed_iteration.txt``
or ``iter_*``), a dist checkpoint (``metadata.json``; skpo-train's ``step_<N>/model``) or skpo-train's
``step_<N>`` directory itself; converted once into ``<cache_dir>/<name>-hf`` by ``checkpoint_convert``,
with the HF config of ``like`` where the checkpoint carries none (for skpo-train's checkpoints, by
default the model the run started from). An skpo-train checkpoint root (``latest``) means its latest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def resolve_model(path: str | Path, cache_dir: Optional[str | Path] = None,
                  like: Optional[str | Path] = None) -> Path:
    """HF directory for ``path`` (converted on the fly if needed; ``like``: an HF directory whose
    config and tokenizer a Megatron checkpoint without its own ``hf/`` side files takes)."""
    p = Path(path)
    if p.is_dir() and (p / "latest").is_file():  # skpo-train's checkpoint root: its latest checkpoint
        p = p / (p / "latest").read_text().strip()
    if p.is_dir() and (p / "model" / "metadata.json").is_file() and (p / "COMPLETE").is_file():
        p = p / "model"  # skpo-train's checkpoint directory: its policy is the ``model`` part
    if p.name == "model" and (p.parent / "COMPLETE").is_file():
        like = like or _trained_from(p.parent)
    if p.is_dir() and (p / "config.json").is_file():
        return p
    if p.is_file() and p.suffix == ".gguf":
        from checkpoint_convert.gguf import gguf_to_hf

        out = Path(cache_dir or p.parent) / f"{p.stem}-hf"
        if not (out / "model.safetensors").is_file():
            gguf_to_hf(p, out, "bfloat16")
        return out
    if p.is_dir() and (any(p.glob("iter_*")) or (p / "latest_checkpointed_iteration.txt").is_file()
                       or (p / "metadata.json").is_file()):
        from checkpoint_convert.convert import mcore_to_hf

        out = Path(cache_dir or p.parent) / f"{p.name}-hf"
        if not (out / "config.json").is_file():
            mcore_to_hf(p, out, like=like)
        return out
    raise FileNotFoundError(f"--model {p}: not an HF directory (config.json), a .gguf file or a Megatron checkpoint")


def _trained_from(step_dir: Path) -> Optional[Path]:
    """The HF model an skpo-train checkpoint started from (its saved config's ``model.hf_path``), whose
    config and tokenizer the export takes; None if the checkpoint does not say or the directory is gone."""
    import json

    try:
        hf = json.loads((step_dir / "config" / "state.json").read_text())["model"]["hf_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Path(hf) if hf and (Path(hf) / "config.json").is_file() else None
