"""Byte sizes as users write them (``--max-shard-size``, ``checkpoint.export_max_shard_size``); no
imports, so the config layer can validate sizes without loading torch or safetensors."""
from __future__ import annotations


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"1024"`` -> bytes (decimal units, as transformers uses)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)
