"""Building what the loop is made of: the process group and its parallel groups, the colocated vLLM
engine, the Megatron policy (and the frozen reference), the problems and their prompts.

Design decisions (ours):
- One process per rank (torchrun/srun set RANK/WORLD_SIZE/MASTER_*); without them the trainer is
  a 1-rank job on a free local port. The process group is gloo without CUDA and nccl with it.
- Colocated (``rollout.placement``): the vLLM engine lives in every rank's process (vLLM's
  ``external_launcher`` joins the job's world), each engine generates its share of the step's
  prompts, and every rank then trains its data-parallel slice. Disaggregated: the engines are
  rollout workers of their own (``trainer.remote``), and the trainer loads the tokenizer itself.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_skpo.config import Config, DatasetConfig
from megatron_skpo.data import EpochSampler, LoadReport, load_dataset, render_all
from megatron_skpo.data.prompts import PromptSlot, get_template
from megatron_skpo.rewards.reference import Reference
from megatron_skpo.rollout.samplers import PromptItem


@dataclass(frozen=True)
class Parallel:
    """This rank's place in the job and the process groups the trainer passes around explicitly."""

    rank: int
    world: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    dp_rank: int
    dp_size: int
    engine_index: int = 0  # this rank's vLLM engine: rank // rollout.tp (an engine's ranks are consecutive)
    engines: int = 1  # world // rollout.tp engines, each generating its share of every step

    @classmethod
    def current(cls, rollout_tp: int = 1) -> "Parallel":
        """From Megatron's parallel state (after :func:`megatron_skpo.model.builder.initialize_parallel`)."""
        from megatron.core import parallel_state as ps

        rank, world = dist.get_rank(), dist.get_world_size()
        return cls(rank, world, ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
                   ps.get_data_parallel_group(), ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                   rank // rollout_tp, world // rollout_tp)

    def share(self, n: int) -> list[int]:
        """The items of ``n`` (a step's prompts, the held-out problems) this rank's engine generates."""
        return [i for i in range(n) if i % self.engines == self.engine_index]

    def gather_shares(self, local):
        """Every engine's ``local`` (one copy per engine, in engine order) on every rank."""
        if self.world == 1:
            return [local]
        parts = [None] * self.world
        dist.all_gather_object(parts, local)
        step = self.world // self.engines  # the ranks of an engine hold the same share: keep its first
        return parts[::step]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (for a 1-rank job's rendezvous, the rollout bridge)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """(rank, world size) of the job; starts a 1-rank job when not launched by torchrun/srun."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def sampling_settings(cfg: Config, stop: tuple[str, ...]):
    from megatron_skpo.rollout.engine import SamplingSettings

    r = cfg.rollout
    return SamplingSettings(r.temperature, r.top_p, r.top_k, tuple(dict.fromkeys([*r.stop, *stop])))


def build_engine(cfg: Config, stop: tuple[str, ...], launcher: str = "external_launcher"):
    """The rollout engine, with the template's stop strings added: colocated in this rank's process
    (``external_launcher``: it joins the job's world), or a rollout worker's own (``local``)."""
    from dataclasses import replace

    from megatron_skpo.rollout.engine import VLLMEngine

    rollout = replace(cfg.rollout, stop=list(dict.fromkeys([*cfg.rollout.stop, *stop])))
    # with model.mcore_path, hf_path need not hold weights: the engine starts from dummy ones, which the
    # loop replaces with the policy's before the first rollout (as it does on every resume)
    return VLLMEngine.from_config(rollout, cfg.model.hf_path, trust_remote_code=cfg.model.trust_remote_code,
                                  launcher=launcher, load_format="dummy" if cfg.model.mcore_path else "auto")


def load_tokenizer(cfg: Config):
    """The HF tokenizer of ``model.hf_path`` (what vLLM's ``get_tokenizer`` loads), for a trainer
    without a colocated engine."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model.hf_path, trust_remote_code=cfg.model.trust_remote_code)


def pin_trainer(spec: str) -> None:
    """Bind the trainer to ``rollout.trainer_cpus`` (its torch threads too), off the workers' cores."""
    if not spec:
        return
    from megatron_skpo.config.rollout import parse_cpus

    cpus = parse_cpus(spec)
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))


def hf_config_of(model_dir: str) -> dict:
    """config.json of an HF checkpoint directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model.hf_path {model_dir}: needs config.json")
    return json.loads(path.read_text())


def start_state(cfg: Config) -> tuple[dict, Optional[dict]]:
    """(config.json, HF tensors) of the run's starting point; no tensors with ``model.mcore_path``
    (the policy loads its shard from that checkpoint: :func:`load_mcore`)."""
    if cfg.model.mcore_path:
        return hf_config_of(cfg.model.hf_path), None
    return hf_state(cfg.model.hf_path)


def load_mcore(gpt, path: str, trust: bool = False) -> None:
    """Load this rank's shard of a GPTModel from a Megatron distributed checkpoint, at any layout:
    an ``skpo-convert hf-to-mcore`` output (``latest_checkpointed_iteration.txt`` + ``release/``) or a
    directory with the dist checkpoint itself (``metadata.json``), the model under key ``model``.
    Its ``.metadata`` is read with the allow-list unpickler, ``common.pt`` and byte objects with
    ``weights_only=True`` first (``checkpoint_convert.untrusted``), unless ``trust``."""
    from megatron.core import dist_checkpointing

    from checkpoint_convert.mcore_io import checkpoint_dir
    from checkpoint_convert.untrusted import check_byte_objects, check_common, load_dist_metadata
    from megatron_skpo.model import cpu_compat

    cpu_compat.apply()
    ckpt = checkpoint_dir(Path(path))
    if not trust:
        check_common(ckpt)
        check_byte_objects(ckpt, load_dist_metadata(ckpt))
    gpt.load_state_dict(dist_checkpointing.load({"model": gpt.sharded_state_dict()}, str(ckpt))["model"])


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


def build_policy_from(cfg: Config, hf_config: dict, weights: Optional[dict], total_updates: int):
    """The policy from HF ``weights``, or (``weights`` None) from ``model.mcore_path``."""
    from functools import partial

    from megatron_skpo.model.train_step import build_policy

    m = cfg.model
    init = partial(load_mcore, path=m.mcore_path) if weights is None else None
    return build_policy(hf_config, cfg.optim, total_steps=total_updates, dtype=m.dtype, fp8=m.fp8,
                        distributed_optimizer=cfg.parallel.distributed_optimizer, hf_weights=weights,
                        init_weights=init,
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


def build_reference(cfg: Config, hf_config: dict, weights: Optional[dict]):
    """The frozen reference policy (the starting weights: ``weights``, or ``model.mcore_path`` when
    None) for the KL penalty; no optimizer."""
    from megatron_skpo.model.builder import build_gpt_model
    from megatron_skpo.model.train_step import Policy
    from megatron_skpo.model.weights import load_hf

    m = cfg.model
    gpt = build_gpt_model(hf_config, dtype=m.dtype, impl=m.transformer_impl,
                          vocab_divisible_by=m.vocab_divisible_by, calculate_per_token_loss=True)
    if weights is None:
        load_mcore(gpt, m.mcore_path)
    else:
        load_hf(gpt, weights, hf_config)
    gpt.requires_grad_(False)
    return Policy(_Frozen(gpt), None, None, hf_config, cfg.rollout.temperature, m.logprob_chunk_size)


@dataclass
class Problems:
    """Problems with their tokenized prompts (``items[i].key == i``) and the load's accounting."""

    items: list[PromptItem]
    refs: list[Reference]  # what each problem's responses are graded against (gold answer, tests, ...)
    report: LoadReport  # rows read, kept and skipped per reason and file (too-long prompts included)


def load_problems(cfg: Config, tokenizer, dataset: Optional[DatasetConfig] = None,
                  field: str = "data.train") -> Problems:
    """The problems of ``dataset`` (default ``data.train``) rendered with the run's prompt template."""
    problems, report = load_dataset(dataset or cfg.data.train, cfg.data.invalid_policy)
    kept, texts, skipped = render_all(problems, cfg.data.prompt_template, tokenizer, cfg.data.use_chat_template,
                                      cfg.rollout.max_prompt_tokens, cfg.data.invalid_policy, report=report)
    if not kept:
        raise ValueError(f"{field}: no usable problem (skipped {skipped} over rollout.max_prompt_tokens)")
    items = []
    for i, (p, text) in enumerate(zip(kept, texts)):
        slot = PromptSlot.of(p, cfg.data.prompt_template, cfg.data.use_chat_template)
        ids = tokenizer(text, add_special_tokens=slot.add_special_tokens)["input_ids"]  # chat text has its specials
        items.append(PromptItem(i, slot.content(p), list(ids), slot))
    return Problems(items, [Reference.of(p.answer, p.meta) for p in kept], report)


def checkpoint_root(cfg: Config) -> str:
    """``checkpoint.dir``, or ``<logging.dir>/checkpoints`` when unset."""
    return cfg.checkpoint.dir if cfg.checkpoint.dir is not None else f"{cfg.logging.dir.rstrip('/')}/checkpoints"


def template_stop(cfg: Config) -> tuple[str, ...]:
    return get_template(cfg.data.prompt_template).stop


def epoch_sampler(cfg: Config, n: int) -> EpochSampler:
    return EpochSampler(n, seed=cfg.data.shuffle_seed)
