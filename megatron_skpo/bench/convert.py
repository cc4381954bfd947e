"""Checkpoint conversion speed: hf-to-mcore and mcore-to-hf of a random model with real HF shapes.

The model is written straight from the architecture's tensor names and shapes (transformers
builds it on the meta device) with N(0, 0.02) weights, so no weights are downloaded and no HF
model is ever materialised. ``--layers`` cuts the depth (the per-layer shapes stay real) so a
laptop can run it; the report states the size actually converted. Times are wall seconds of each
direction; GB/s is weight bytes over that time; RSS figures come from
:class:`checkpoint_convert.measure.Measure` (lifetime peak, and the growth during each direction).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from megatron_skpo.model.families import FAMILIES


def _family(model_type: str, **shape) -> dict:
    """A config.json of a registered family (its architecture class from the family spec)."""
    return dict(model_type=model_type, architectures=[FAMILIES[model_type].architecture], **shape)


PRESETS = {
    "qwen2.5-1.5b": _family("qwen2", hidden_size=1536,
                            intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                            num_hidden_layers=28, vocab_size=151936, tie_word_embeddings=True,
                            rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6),
    "llama-3.2-1b": _family("llama", hidden_size=2048,
                            intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                            num_hidden_layers=16, vocab_size=128256, tie_word_embeddings=True,
                            rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                            rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "smollm2-135m": _family("llama", hidden_size=576,
                            intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                            num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True,
                            rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
}
DTYPES = ("bf16", "fp16", "fp32")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="qwen2.5-1.5b", choices=sorted(PRESETS), help="HF config shapes")
    p.add_argument("--hf-config", help="a config.json to use instead of --preset")
    p.add_argument("--layers", type=int, default=2, help="num_hidden_layers to build (0: the preset's)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--max-shard-size", default="1GB")
    p.add_argument("--workdir", help="where to write the three checkpoints (default: a temp dir)")


def write_random_hf(config: dict, out: Path, dtype: str, max_shard_size: str, seed: int = 0) -> int:
    """Random-weight HF checkpoint of ``config`` at ``out``; returns the weight bytes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from checkpoint_convert import hf_io
    from checkpoint_convert.sizes import parse_size
    from checkpoint_convert.checks import DTYPES as TORCH_DTYPES

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        names = {k: v.shape for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        names.pop("lm_head.weight", None)
    dt = TORCH_DTYPES[dtype]
    sizes = [(n, s.numel() * dt.itemsize) for n, s in names.items()]
    plan = hf_io.plan_shards(sizes, parse_size(max_shard_size))
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    for k, shard in enumerate(plan):
        tensors = {n: (torch.randn(names[n], generator=g) * 0.02).to(dt) for n in shard}
        hf_io.write_shard(out, k, len(plan), tensors)
    total = sum(n for _, n in sizes)
    hf_io.write_index(out, plan, total)
    cfg.save_pretrained(out)
    return total


def run(args: argparse.Namespace) -> dict:
    from checkpoint_convert.convert import hf_to_mcore, mcore_to_hf
    from checkpoint_convert.measure import Measure

    config = json.loads(Path(args.hf_config).read_text()) if args.hf_config else dict(PRESETS[args.preset])
    if args.layers:
        config["num_hidden_layers"] = args.layers
    with tempfile.TemporaryDirectory(prefix="skpo-bench-convert-", dir=args.workdir) as tmp:
        root = Path(tmp)
        nbytes = write_random_hf(config, root / "hf", args.dtype, args.max_shard_size)
        to_mc = hf_to_mcore(root / "hf", root / "mcore", tp=args.tp, pp=args.pp)
        to_hf = mcore_to_hf(root / "mcore", root / "hf_out", max_shard_size=args.max_shard_size)
    direction = lambda r: {"seconds": r.seconds, "gb_per_s": round(r.gb_per_s, 4),  # noqa: E731
                              "rss_growth_mb": r.peak_delta_mb}
    return {"bench": "convert", "model": args.hf_config or args.preset, "num_layers": config["num_hidden_layers"],
            "weight_gb": round(nbytes / 1e9, 4), "dtype": args.dtype, "tp": args.tp, "pp": args.pp,
            "hf_to_mcore": direction(to_mc), "mcore_to_hf": direction(to_hf),
            "peak_rss_mb": round(Measure.lifetime_peak_mb(), 1)}
