"""One typed config tree: ``SKPOConfig``-style root with a section per component.

``load_config(recipe, overrides)`` reads a YAML recipe, applies dotted CLI overrides
(``algo.group_size=16``) and validates everything, naming the bad field on error.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from megatron_skpo.config.algo import AlgoConfig
from megatron_skpo.config.algorithms import ALGORITHMS, algorithm, check_algorithm, family
from megatron_skpo.config.base import (ConfigError, apply_override, deep_merge, describe, doc, from_dict, leaf_keys,
                                       to_dict)
from megatron_skpo.config.data import DataConfig, DatasetConfig, RewardConfig
from megatron_skpo.config.model import ModelConfig, ParallelConfig
from megatron_skpo.config.rollout import RolloutConfig
from megatron_skpo.config.train import CheckpointConfig, LoggingConfig, OptimConfig, TrainConfig, ValidationConfig
from megatron_skpo.config.yaml_load import load_yaml


@dataclass
class Config:
    """Root of the config tree."""

    model: ModelConfig = doc(factory=ModelConfig, help="policy model")
    parallel: ParallelConfig = doc(factory=ParallelConfig, help="tensor/pipeline parallelism")
    rollout: RolloutConfig = doc(factory=RolloutConfig, help="generation")
    algo: AlgoConfig = doc(factory=AlgoConfig, help="RL algorithm")
    optim: OptimConfig = doc(factory=OptimConfig, help="optimizer and schedule")
    train: TrainConfig = doc(factory=TrainConfig, help="outer loop")
    data: DataConfig = doc(factory=DataConfig, help="problems and prompts")
    reward: RewardConfig = doc(factory=RewardConfig, help="verifiable reward")
    validation: ValidationConfig = doc(factory=ValidationConfig, help="validation on data.eval inside the loop")
    checkpoint: CheckpointConfig = doc(factory=CheckpointConfig, help="checkpointing")
    logging: LoggingConfig = doc(factory=LoggingConfig, help="metrics")


def parse_override(item: str) -> tuple[str, object]:
    """``'algo.group_size=16'`` -> ``('algo.group_size', 16)``; values are parsed as YAML
    (:func:`.yaml_load.load_yaml`: no alias bombs, no repeated keys)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value (e.g. algo.group_size=16)")
    key, raw = item.split("=", 1)
    return key.strip(), load_yaml(raw, f"override '{item:.80}'") if raw.strip() else ""


BASE_KEY = "base"


def read_recipe(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A YAML recipe as a nested dict, with its ``base:`` recipe (a path relative to it) merged under it.

    Read by :func:`.yaml_load.load_yaml`: an alias bomb or a repeated key is an error naming the
    file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path}: no such file")
    if path.resolve() in _seen:
        raise ConfigError(f"recipe {path}: 'base' chain loops back to itself ({' -> '.join(map(str, _seen))})")
    data = load_yaml(path.read_text(), str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: top level must be a mapping of sections")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"recipe {path}: base: expected a recipe path, got {base!r}")
    return deep_merge(read_recipe(path.parent / base, (*_seen, path.resolve())), data)


def load_config(recipe: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Read a YAML recipe (or the defaults), apply overrides, validate, return the typed tree.

    Layers, lowest first: dataclass defaults, the defaults of ``algo.name``
    (:mod:`.algorithms`), the recipe's ``base`` chain, the recipe, the overrides.
    """
    data: dict = read_recipe(recipe) if recipe is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        apply_override(data, key, value, Config)
    explicit = leaf_keys(data)
    name = (data.get("algo") or {}).get("name", AlgoConfig.name)
    for key, value in algorithm(name).defaults.items():
        if key not in explicit and not any(key.startswith(e + ".") for e in explicit):
            apply_override(data, key, value, Config)
    cfg = from_dict(Config, data)
    validate_cross(cfg)
    check_algorithm(cfg, explicit)
    return cfg


def load_resolved(path: str | Path) -> Config:
    """A run's ``config.yaml`` (``dump_config`` of a validated config) read back as a Config.

    The dump holds every key, the ones its algorithm ignores included, so it is not a recipe: the
    algorithm's read rules (which refuse set-but-ignored keys) do not apply; the types, ranges and
    cross-section checks do.
    """
    data = read_recipe(path)
    cfg = from_dict(Config, data)
    validate_cross(cfg)
    return cfg


def validate_cross(cfg: Config) -> None:
    """Checks that span sections or need the algorithm registries."""
    from megatron_skpo.algo import registries  # late imports: the maths does not depend on config
    from megatron_skpo.algo.aggregation import AGG_MODES
    from megatron_skpo.skpo.segment import SEGMENT_SELECTORS

    algo = cfg.algo
    for path, name, reg in (
        ("algo.advantage", algo.advantage, registries.ADVANTAGES),
        ("algo.policy_loss", algo.policy_loss, registries.POLICY_LOSSES),
        ("algo.skpo.upstream_loss", algo.skpo.upstream_loss, registries.POLICY_LOSSES),
        ("algo.skpo.downstream_loss", algo.skpo.downstream_loss, registries.POLICY_LOSSES),
        ("algo.skpo.selection", algo.skpo.selection, SEGMENT_SELECTORS),
        ("algo.kl.estimator", algo.kl.estimator, registries.KL_ESTIMATORS),
        ("algo.off_policy", algo.off_policy, registries.OFF_POLICY_CORRECTIONS),
    ):
        if name not in reg:
            raise ConfigError(f"{path}: got {name!r}; allowed values: {', '.join(map(repr, reg.names()))}")
    for path, mode in (("algo.loss_agg_mode", algo.loss_agg_mode),
                       ("algo.skpo.upstream_agg_mode", algo.skpo.upstream_agg_mode),
                       ("algo.skpo.downstream_agg_mode", algo.skpo.downstream_agg_mode)):
        if mode not in AGG_MODES:
            raise ConfigError(f"{path}: got {mode!r}; allowed values: {', '.join(map(repr, AGG_MODES))}")
    if family(cfg) == "skpo":  # SPO's value tracker maps rewards in [-1, 1] to success probabilities
        r = cfg.reward
        for path, value in (("reward.correct", r.correct), ("reward.incorrect", r.incorrect),
                            ("reward.incorrect + reward.format_penalty", r.incorrect + r.format_penalty)):
            if not -1.0 <= value <= 1.0:
                raise ConfigError(f"{path}: {value} is outside [-1, 1], which SKPO's upstream value "
                                  "tracker needs (R_II = +1 / -1; see docs/algorithm.md)")
    if cfg.rollout.max_prompt_tokens + cfg.rollout.max_response_tokens <= 0:
        raise ConfigError("rollout: max_prompt_tokens + max_response_tokens must be > 0")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


__all__ = [
    "ALGORITHMS", "family", "read_recipe", "load_resolved",
    "Config", "ConfigError", "load_config", "dump_config", "describe", "to_dict", "from_dict",
    "AlgoConfig", "DataConfig", "DatasetConfig", "RewardConfig", "ModelConfig", "ParallelConfig",
    "RolloutConfig", "OptimConfig", "TrainConfig", "CheckpointConfig", "LoggingConfig", "ValidationConfig",
]
