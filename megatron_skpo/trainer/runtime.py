"""What the loop is made of: the process group, the Megatron policy, the colocated vLLM engine,
the problems and their prompts, the model/optimizer checkpoint part and the HF export.

Design decisions (ours):
- One process per rank (torchrun/srun set RANK/WORLD_SIZE/MASTER_*); without them the trainer is
  a 1-rank job on a free local port. The process group is gloo without CUDA and nccl with it.
- The vLLM engine lives in every rank's process (``rollout.launcher: external_launcher`` joins the
  job's world; ``local`` is accepted only for a 1-rank job). Every rank generates the whole step's
  rollouts with the same seed (identical batches), then trains on its data-parallel slice of the
  prompts: simple and exact; sharding generation over DP ranks is future work.
- Model + optimizer checkpoints (``ModelPart``): every rank ``torch.save``s its own model shard,
  the inner torch optimizer's state, its fp32 master weights (plain or distributed-optimizer shard)
  and the LR schedule, read back with ``torch.load(weights_only=True)``. Exact on CPU and at any
  TP/PP, but a resume needs the same world size and parallel layout (dist_checkpointing would
  reshard; not needed for exact resume).
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_skpo.config import Config
from megatron_skpo.data import EpochSampler, load_dataset, render_all
from megatron_skpo.data.prompts import get_template
from megatron_skpo.rollout.samplers import PromptItem


def init_distributed() -> tuple[int, int]:
    """(rank, world size) of the job; starts a 1-rank job when not launched by torchrun/srun."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def sampling_settings(cfg: Config, stop: tuple[str, ...]):
    from megatron_skpo.rollout.engine import SamplingSettings

    r = cfg.rollout
    return SamplingSettings(r.temperature, r.top_p, r.top_k, tuple(dict.fromkeys([*r.stop, *stop])))


def build_engine(cfg: Config, world: int, stop: tuple[str, ...]):
    """The rollout engine on this rank (a 1-rank ``local`` engine is colocated the same way)."""
    from dataclasses import replace

    from megatron_skpo.rollout.engine import VLLMEngine

    if cfg.rollout.launcher == "local" and world > 1:
        raise ValueError("rollout.launcher: 'local' cannot be colocated in a multi-rank job; use external_launcher")
    rollout = replace(cfg.rollout, launcher="external_launcher", stop=list(dict.fromkeys([*cfg.rollout.stop, *stop])))
    return VLLMEngine.from_config(rollout, cfg.model.hf_path)


def hf_state(model_dir: str) -> tuple[dict, dict]:
    """(config.json dict, HF tensors) of an HF checkpoint directory (safetensors only)."""
    from safetensors.torch import load_file

    path = Path(model_dir)
    files = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or not files:
        raise FileNotFoundError(f"model.hf_path {model_dir}: needs config.json and *.safetensors")
    weights: dict = {}
    for f in files:
        weights.update(load_file(f))
    return json.loads((path / "config.json").read_text()), weights


def build_policy_from(cfg: Config, hf_config: dict, weights: dict, total_updates: int):
    from megatron_skpo.model.train_step import build_policy

    m = cfg.model
    return build_policy(hf_config, cfg.optim, total_steps=total_updates, dtype=m.dtype,
                        distributed_optimizer=cfg.parallel.distributed_optimizer, hf_weights=weights,
                        temperature=cfg.rollout.temperature, logprob_chunk=m.logprob_chunk_size,
                        impl=m.transformer_impl, recompute=m.recompute,
                        sequence_parallel=cfg.parallel.sequence_parallel, vocab_divisible_by=m.vocab_divisible_by,
                        moe_aux_loss_coef=m.moe_aux_loss_coef)


class _Frozen(torch.nn.Module):
    """A bare GPTModel under the ``.module`` attribute the schedules and ``Policy.gpt`` unwrap."""

    def __init__(self, gpt):
        super().__init__()
        self.module = gpt

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def build_reference(cfg: Config, hf_config: dict, weights: dict):
    """The frozen reference policy (the starting weights) for the KL penalty; no optimizer."""
    from megatron_skpo.model.builder import build_gpt_model
    from megatron_skpo.model.train_step import Policy
    from megatron_skpo.model.weights import load_hf

    m = cfg.model
    gpt = build_gpt_model(hf_config, dtype=m.dtype, impl=m.transformer_impl,
                          vocab_divisible_by=m.vocab_divisible_by, calculate_per_token_loss=True)
    load_hf(gpt, weights, hf_config)
    gpt.requires_grad_(False)
    return Policy(_Frozen(gpt), None, None, hf_config, cfg.rollout.temperature, m.logprob_chunk_size)


@dataclass
class Problems:
    """The training problems with their tokenized prompts; ``items[i].key == i``."""

    items: list[PromptItem]
    answers: list[str]
    skipped_too_long: int


def load_problems(cfg: Config, tokenizer) -> Problems:
    problems, _ = load_dataset(cfg.data.train, cfg.data.invalid_policy)
    kept, texts, skipped = render_all(problems, cfg.data.prompt_template, tokenizer, cfg.data.use_chat_template,
                                      cfg.rollout.max_prompt_tokens, cfg.data.invalid_policy)
    if not kept:
        raise ValueError(f"data.train: no usable problem (skipped {skipped} over rollout.max_prompt_tokens)")
    chat = cfg.data.use_chat_template and get_template(cfg.data.prompt_template).chat
    items = []
    for i, (p, text) in enumerate(zip(kept, texts)):
        ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]  # chat text carries its specials
        items.append(PromptItem(i, p.prompt if isinstance(p.prompt, str) else text, list(ids)))
    return Problems(items, [p.answer for p in kept], skipped)


def template_stop(cfg: Config) -> tuple[str, ...]:
    return get_template(cfg.data.prompt_template).stop


def epoch_sampler(cfg: Config, n: int) -> EpochSampler:
    return EpochSampler(n, seed=cfg.data.shuffle_seed)


class ModelPart:
    """Model shard, optimizer (inner state + fp32 master weights) and LR schedule of one rank."""

    collective = True

    def __init__(self, policy, rank: int):
        self.policy, self.rank = policy, rank

    def _file(self, directory: Path) -> Path:
        return directory / f"rank_{self.rank:05d}.pt"

    def _masters(self) -> list[torch.Tensor]:
        return [p for g in self.policy.optimizer.optimizer.param_groups for p in g["params"]]

    def save(self, directory: Path) -> None:
        p = self.policy
        torch.save({"model": {k: v.detach().clone() for k, v in p.gpt.named_parameters()},
                    "optimizer": p.optimizer.optimizer.state_dict(),
                    "masters": [t.detach().clone() for t in self._masters()],
                    "scheduler": p.scheduler.state_dict()}, self._file(directory))

    def load(self, directory: Path) -> None:
        path = self._file(directory)
        if not path.is_file():
            raise FileNotFoundError(f"missing {path} (resume with the same world size and TP/PP)")
        state = torch.load(path, weights_only=True)
        p = self.policy
        with torch.no_grad():
            for name, param in p.gpt.named_parameters():
                param.copy_(state["model"][name])
            for t, saved in zip(self._masters(), state["masters"], strict=True):
                t.copy_(saved)
        p.optimizer.optimizer.load_state_dict(state["optimizer"])
        p.scheduler.load_state_dict(state["scheduler"])


def export_hf(policy, hf_config: dict, source_dir: str, out_dir: str, rank: int,
              shard_bytes: int = 5 * 10**9) -> Optional[Path]:
    """Write the policy as an HF checkpoint (collective: every rank calls it).

    Tensors stream unit by unit through the rollout weight sync's ``megatron_to_hf_stream`` (TP
    gather, PP broadcast), so no rank ever holds the whole model; rank 0 writes shards of at most
    ``shard_bytes`` (one ``model.safetensors`` when it fits, else ``model-0000k-of-0000n`` plus the
    index) and the source's config/tokenizer files into a staged directory renamed at the end.
    """
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    from checkpoint_convert.hf_io import copy_side_files, shard_name, write_index
    from checkpoint_convert.staging import staged_dir
    from megatron_skpo.rollout.weight_sync import megatron_to_hf_stream

    stream = megatron_to_hf_stream(policy.model, hf_config, tp_group=ps.get_tensor_model_parallel_group(),
                                   pp_group=ps.get_pipeline_model_parallel_group())
    if rank != 0:
        for _ in stream:  # take part in the collectives
            pass
        return None
    dtype = getattr(torch, str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"), torch.float32)
    with staged_dir(out_dir, force=True) as tmp:
        shards, current, used, total = [], {}, 0, 0
        for name, t in stream:
            t = t.to(dtype).contiguous()
            if current and used + t.nbytes > shard_bytes:
                save_file(current, tmp / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
                shards, current, used = shards + [list(current)], {}, 0
            current[name], used, total = t, used + t.nbytes, total + t.nbytes
        save_file(current, tmp / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
        shards.append(list(current))
        if len(shards) == 1:
            os.replace(tmp / "part-0.safetensors", tmp / "model.safetensors")
        else:
            for k in range(len(shards)):
                os.replace(tmp / f"part-{k}.safetensors", tmp / shard_name(k, len(shards)))
            write_index(tmp, shards, total)
        copy_side_files(source_dir, tmp)
    return Path(out_dir)
