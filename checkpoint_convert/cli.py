"""``skpo-convert``: HF <-> Megatron checkpoints and a strict logit check.

  skpo-convert hf-to-mcore --hf DIR|FILE.gguf --out DIR --tp N --pp M [--ep E] [--dtype auto|bf16|fp16|fp32]
  skpo-convert mcore-to-hf --mcore DIR --out DIR [--like HF_DIR] [--max-shard-size 5GB] [--trust-checkpoint]
  skpo-convert verify --hf DIR|FILE.gguf --mcore DIR [--tp N] [--ep E] [--max-abs 1e-4 ...] [--trust-checkpoint]

Each command prints one JSON line. Exit status: 0 success, 1 verification above a threshold,
2 invalid input (nothing written; the message names the file, tensor or field).

Megatron checkpoints are treated as untrusted: their pickled metadata (and, for verify, pickled
objects) must use only the classes the format needs, or the command refuses them (exit 2; see
checkpoint_convert/untrusted.py). ``--trust-checkpoint`` loads them unchecked, as torch would:
only for checkpoints from a source you trust, since a crafted pickle runs arbitrary code.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

from checkpoint_convert.staging import ConvertError, check_separate
from checkpoint_convert.untrusted import UntrustedCheckpointError
from checkpoint_convert.verify import Thresholds


@contextlib.contextmanager
def hf_source(path: str, dtype: str = "bfloat16") -> Iterator[Path]:
    """An HF directory for ``path``; a ``.gguf`` file is dequantised into a temporary one first."""
    p = Path(path)
    if p.suffix != ".gguf":
        yield p
        return
    from checkpoint_convert.gguf import gguf_to_hf

    with tempfile.TemporaryDirectory(prefix="skpo-gguf-") as tmp:
        yield gguf_to_hf(p, Path(tmp) / "hf", dtype=dtype)


def _gguf_dtype(dtype: str) -> str:
    return {"fp32": "float32", "fp16": "float16"}.get(dtype, "bfloat16")


def _hf_to_mcore(a: argparse.Namespace) -> int:
    from checkpoint_convert.convert import hf_to_mcore

    check_separate(a.out, {"--hf": a.hf})  # a .gguf input is dequantised first: check the file itself
    with hf_source(a.hf, _gguf_dtype(a.dtype)) as hf_dir:
        report = hf_to_mcore(hf_dir, a.out, tp=a.tp, pp=a.pp, dtype=a.dtype, force=a.force,
                             vocab_divisible_by=a.vocab_divisible_by, ep=a.ep)
    print(json.dumps(report.as_dict()))
    return 0


def _mcore_to_hf(a: argparse.Namespace) -> int:
    from checkpoint_convert.convert import mcore_to_hf

    report = mcore_to_hf(a.mcore, a.out, like=a.like, max_shard_size=a.max_shard_size, dtype=a.dtype,
                         force=a.force, trust_checkpoint=a.trust_checkpoint)
    print(json.dumps(report.as_dict()))
    return 0


def _verify(a: argparse.Namespace) -> int:
    from checkpoint_convert.verify import verify

    th = Thresholds(max_abs=a.max_abs, mean_abs=a.mean_abs, kl_max=a.kl_max, top1_min=a.top1_min)
    try:
        with hf_source(a.hf, "float32") as hf_dir:
            result = verify(hf_dir, a.mcore, tp=a.tp, th=th, trust_checkpoint=a.trust_checkpoint, ep=a.ep)
    except (KeyboardInterrupt, SystemExit, UntrustedCheckpointError):
        raise
    except BaseException as e:  # a checkpoint that does not even load fails verification too
        # (torch.distributed.checkpoint's CheckpointException derives from BaseException)
        result = {"ok": False, "failed": ["load"], "error": f"{type(e).__name__}: {e}"[:2000], "tp": a.tp,
                  "ep": a.ep}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="skpo-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors (or GGUF) -> Megatron dist checkpoint")
    a.add_argument("--hf", required=True, help="HF model directory, or a .gguf file")
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel layout to write")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (checked, recorded)")
    a.add_argument("--ep", type=int, default=1, help="expert-parallel size of an MoE model (checked, recorded)")
    a.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    a.add_argument("--vocab-divisible-by", type=int, default=128,
                   help="Megatron's make_vocab_size_divisible_by (vocab padded to a multiple of it x TP; 0: none)")
    a.add_argument("--force", action="store_true", help="replace a non-empty --out")
    a.set_defaults(fn=_hf_to_mcore)
    b = sub.add_parser("mcore-to-hf", help="Megatron dist checkpoint -> sharded HF safetensors")
    b.add_argument("--mcore", required=True, help="checkpoint root (with the tracker file) or dist checkpoint dir")
    b.add_argument("--out", required=True)
    b.add_argument("--like", help="HF directory to take config/tokenizer files from (default: saved copy)")
    b.add_argument("--max-shard-size", default="5GB")
    b.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    b.add_argument("--force", action="store_true")
    b.add_argument("--trust-checkpoint", action="store_true",
                   help="load the Megatron checkpoint without checking its pickles (runs any code a crafted one holds)")
    b.set_defaults(fn=_mcore_to_hf)
    c = sub.add_parser("verify", help="compare HF and Megatron logits on the same prompts")
    c.add_argument("--hf", required=True)
    c.add_argument("--mcore", required=True)
    c.add_argument("--tp", type=int, default=1, help="tensor-parallel size to load the checkpoint at")
    c.add_argument("--ep", type=int, default=1, help="expert-parallel size to load an MoE checkpoint at "
                   "(tp * ep ranks)")
    defaults = Thresholds()
    for name in ("max_abs", "mean_abs", "kl_max", "top1_min"):
        c.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    c.add_argument("--trust-checkpoint", action="store_true",
                   help="load the Megatron checkpoint without checking its pickles (runs any code a crafted one holds)")
    c.set_defaults(fn=_verify)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConvertError, FileNotFoundError) as e:
        print(json.dumps({"ok": False, "error": str(e)}))
        print(f"skpo-convert: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
