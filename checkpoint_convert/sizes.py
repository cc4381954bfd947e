"""Byte sizes as users write them (``--max-shard-size``, ``checkpoint.export_max_shard_size``); no
imports, so the config layer can validate sizes without loading torch or safetensors."""
from __future__ import annotations


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"1024"`` -> bytes (decimal units, as transformers uses)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    number, mult = t, 1
    for unit, m in units.items():
        if t.endswith(unit):
            number, mult = t[: -len(unit)], m
            break
    try:
        return int(float(number) * mult)
    except ValueError:
        raise ValueError(f"{text!r} is not a size: write a number with an optional unit B, KB, MB, GB or TB "
                         "(e.g. 5GB, 500MB, 1048576)") from None
