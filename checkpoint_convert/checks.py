"""Everything a conversion validates before it writes a byte: architecture, parallel sizes, tensors.

The expected tensors come from Megatron itself (the meta-device template model, see
:mod:`.mcore_io`) pushed through the architecture's ``to_hf`` on meta tensors, so "missing",
"extra" and "shape mismatch" are judged against exactly what the model will load.
"""
from __future__ import annotations

import re
from types import ModuleType

import torch

from checkpoint_convert.staging import ConvertError
from megatron_skpo.model.mappings import get_mapping
from megatron_skpo.model.mappings.common import EMBED, OUTPUT
from megatron_skpo.model.mappings.units import mcore_unit, to_hf_unit, units

# Present in some HF checkpoints, recomputed by every loader: accepted and skipped.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def architecture(hf_config: dict) -> ModuleType:
    """The mapping module for ``hf_config`` after the Megatron builder accepts every field."""
    from megatron_skpo.model.hf_config import HFConfigError, transformer_config_kwargs

    try:
        mapping = get_mapping(str(hf_config.get("model_type")))
        transformer_config_kwargs(hf_config)
    except (KeyError, HFConfigError) as e:
        raise ConvertError(f"unknown or unsupported architecture: {e.args[0]}") from None
    return mapping


CONFIG_SIZES = ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads", "intermediate_size")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_config_fits(hf_config: dict, tensors: dict[str, tuple[int, ...]], where: str) -> None:
    """``config.json``'s sizes against the tensors present, before Megatron builds anything.

    A config claiming 10**9 layers (or a vocabulary the embedding lacks) would otherwise reach the
    meta-model build and end in a MemoryError; here it is one line naming the field and the tensors.
    """
    for key in CONFIG_SIZES:
        value = hf_config.get(key)
        if key in hf_config and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConvertError(f"{where}/config.json: {key} must be a positive integer, got {value!r:.60}")
    layers = sorted({int(m.group(1)) for n in tensors if (m := LAYER.match(n))})
    want = hf_config.get("num_hidden_layers")
    if want is not None and (len(layers) != want or layers and layers[-1] != want - 1):  # i.e. != 0..want-1
        held = f"layers {layers[0]}..{layers[-1]} ({len(layers)} distinct)" if layers else "no model.layers.* tensors"
        raise ConvertError(f"{where}/config.json: num_hidden_layers={want} but the safetensors files hold {held}")
    embed = tensors.get("model.embed_tokens.weight")
    vocab, hidden = hf_config.get("vocab_size"), hf_config.get("hidden_size")
    if embed is not None and vocab is not None and hidden is not None and tuple(embed) != (vocab, hidden):
        raise ConvertError(f"{where}/config.json: vocab_size={vocab}, hidden_size={hidden} but tensor "
                           f"model.embed_tokens.weight is {list(embed)}")


def check_parallel(hf_config: dict, tp: int, pp: int, padded: int, ep: int = 1) -> None:
    """Error naming the field when TP/PP/EP cannot split this model evenly."""
    from megatron_skpo.model.hf_config import moe_spec

    if tp < 1 or pp < 1 or ep < 1:
        raise ConvertError(f"--tp {tp} --pp {pp} --ep {ep}: all must be >= 1")
    heads = int(hf_config["num_attention_heads"])
    moe = moe_spec(hf_config)
    sizes = {"num_attention_heads": heads,
             "num_key_value_heads": int(hf_config.get("num_key_value_heads") or heads),
             "vocab_size (padded)": padded}
    if moe is None:
        sizes["intermediate_size"] = int(hf_config["intermediate_size"])
    else:  # each expert is split over TP (Megatron's expert tensor parallelism equals TP here)
        sizes["moe_intermediate_size"] = moe.ffn_hidden_size
    bad = [f"{k}={v}" for k, v in sizes.items() if v % tp]
    if bad:
        raise ConvertError(f"TP={tp} does not divide {', '.join(bad)}")
    if int(hf_config["num_hidden_layers"]) % pp:
        raise ConvertError(f"PP={pp} does not divide num_hidden_layers={hf_config['num_hidden_layers']}")
    if ep > 1 and moe is None:
        raise ConvertError(f"EP={ep}: expert parallelism needs a mixture-of-experts model "
                           f"(model_type '{hf_config.get('model_type')}' is dense; use --ep 1)")
    if moe is not None and moe.num_experts % ep:
        raise ConvertError(f"EP={ep} does not divide num_experts={moe.num_experts}")


def expected_hf(mapping: ModuleType, hf_config: dict, params: dict[str, torch.Tensor]) -> dict[int, dict]:
    """``{unit: {hf name: meta tensor}}`` for the Megatron ``params`` (meta, padded vocab)."""
    vocab = int(hf_config["vocab_size"])
    out = {}
    for u in units(int(hf_config["num_hidden_layers"])):
        mc = {k: v[:vocab] if k in (EMBED, OUTPUT) else v for k, v in params.items() if mcore_unit(k) == u}
        out[u] = to_hf_unit(mapping, hf_config, u, mc)
    return out


def check_hf_tensors(found: dict[str, tuple[int, ...]], expected: dict[int, dict], where: str) -> None:
    """Missing, extra (named) and wrongly shaped tensors, all reported at once."""
    want = {n: tuple(t.shape) for unit in expected.values() for n, t in unit.items()}
    missing = sorted(set(want) - set(found))
    extra = sorted(n for n in set(found) - set(want) if not n.endswith(IGNORED_SUFFIXES))
    shapes = [f"{n}: expected {list(want[n])}, found {list(found[n])}"
              for n in sorted(set(want) & set(found)) if tuple(found[n]) != want[n]]
    problems = ([f"missing tensors {missing}"] if missing else []) + (
        [f"unexpected tensors {extra}"] if extra else []) + (
        [f"shape mismatch: {'; '.join(shapes)}"] if shapes else [])
    if problems:
        raise ConvertError(f"{where}: " + " | ".join(problems))


def check_mcore_keys(stored: dict[str, tuple], tpl_sharded: dict, where: str) -> None:
    """Model keys Megatron expects vs those stored (optimizer/other keys are not ours to judge)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    want = {}
    for entry in tpl_sharded.values():
        if isinstance(entry, ShardedTensor):
            want[entry.key] = tuple(entry.global_shape)
        elif isinstance(entry, ShardedTensorFactory):
            want[entry.key] = None  # its parts share the key; their shapes are checked on load
    model_keys = {k for k in stored if k.startswith(("embedding.", "decoder.", "output_layer."))}
    missing = sorted(set(want) - set(stored))
    extra = sorted(model_keys - set(want))
    shapes = [f"{k}: expected {list(s)}, found {list(stored[k][0])}" for k, s in want.items()
              if s is not None and k in stored and tuple(stored[k][0]) != s and not k.startswith("embedding.")]
    problems = ([f"missing tensors {missing}"] if missing else []) + (
        [f"unexpected tensors {extra}"] if extra else []) + (
        [f"shape mismatch: {'; '.join(shapes)}"] if shapes else [])
    if problems:
        raise ConvertError(f"{where}: " + " | ".join(problems))
