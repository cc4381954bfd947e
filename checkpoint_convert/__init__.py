"""HF <-> Megatron-core checkpoint conversion (per-architecture ``to_hf``/``from_hf`` mappings)."""
