"""A stand-in ``model.safetensors`` for checks that read headers, never weights: one empty tensor per
layer ``config.json`` declares, so preflight's config-against-tensors check sees a consistent model."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def header_only_weights(model_dir: Path, num_hidden_layers: int) -> Path:
    path = Path(model_dir) / "model.safetensors"
    save_file({f"model.layers.{i}.input_layernorm.weight": torch.zeros(0) for i in range(num_hidden_layers)}, path)
    return path
