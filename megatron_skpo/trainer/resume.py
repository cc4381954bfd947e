"""A resume that is right or refuses: the checkpoint records the config it was made with.

On resume the recorded config is compared with the current one, key by key:
- keys that cannot change mid-run (``FROZEN``: the algorithm and its trackers, the group size, the
  model, the expert-parallel size and the optimizer kind, the training problems and how prompts are
  rendered, the seed, the reward values) are errors naming the key, both values and why;
- every other key may change (learning rate and schedule, steps, validation, logging, ...); the
  change is applied and announced. The learning-rate schedule is rebuilt from the new optimizer
  settings (``ModelPart`` loads the step count, not the old schedule values).

The model and optimizer are one Megatron distributed checkpoint (``trainer/model_state.py``), so
``parallel.tp``, ``parallel.pp`` and the world size (data parallelism) may change: the resumed run
reshards them. Per-rank state follows (``trainer/parts.py``): the drift store is merged, the RNG
streams are reseeded from (train.seed, step, rank) with a warning.
"""
from __future__ import annotations

from typing import Any

from megatron_skpo.config import Config, to_dict

# dotted prefix -> why it cannot change in the middle of a run
FROZEN: dict[str, str] = {
    "algo.name": "the saved trackers, advantages and objective belong to this algorithm",
    "algo.group_size": "the saved trackers and the sampler's groups were built with this G",
    "algo.advantage": "the advantages the run optimised so far belong to this estimator",
    "algo.skpo": "SKPO's saved length tracker and segment statistics belong to these settings",
    "algo.tracker": "the saved value tracker was built with these settings",
    "algo.dense_mc": "the Monte Carlo estimates belong to these settings",
    "model": "the weights belong to this model, dtype and layer implementation",
    # parallel.tp and parallel.pp reshard (a dist checkpoint holds global tensors); these do not:
    "parallel.ep": "resharding the expert-parallel optimizer state is not tested (resume with the saved ep)",
    "parallel.distributed_optimizer": "the distributed and the plain optimizer save different state (the plain "
                                      "one keeps no fp32 copy of the fp32 parameters of a bf16 model)",
    "data.train": "the saved data order indexes these problems",
    "data.prompt_template": "the trackers and stored responses belong to these prompts",
    "data.use_chat_template": "the trackers and stored responses belong to these prompts",
    "data.shuffle_seed": "the saved data order was drawn with this seed",
    "train.seed": "every step's random streams derive from this seed",
    "reward.correct": "the tracked values are in this reward scale",
    "reward.incorrect": "the tracked values are in this reward scale",
    "reward.format_penalty": "the tracked values are in this reward scale",
    "reward.kind": "the tracked values belong to this reward",
}
# may change, but only the explicitly mutable subkeys of a frozen prefix
MUTABLE_INSIDE: tuple[str, ...] = ("model.logprob_chunk_size", "model.recompute")


class ResumeConfigError(ValueError):
    """A resumed run's config changes a key that cannot change mid-run."""


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flat(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def frozen_reason(key: str) -> str | None:
    if key in MUTABLE_INSIDE:
        return None
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        why = FROZEN.get(".".join(parts[:n]))
        if why is not None:
            return why
    return None


def compare(saved: dict, current: dict, defaults: dict | None = None) -> tuple[list[str], list[str]]:
    """(errors, changes): one line per frozen key that differs, and per other key that differs.

    A key the saved config lacks (it was saved by a release without that setting) is unchanged when
    its current value is its default in ``defaults``: that release behaved as the default does.
    """
    a, b = _flat(saved), _flat(current)
    known = _flat(defaults) if defaults is not None else {}
    errors, changes = [], []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, "<absent>"), b.get(key, "<absent>")
        if old == new or (key not in a and key in known and new == known[key]):
            continue
        why = frozen_reason(key)
        (errors if why else changes).append(f"{key}: {old!r} -> {new!r}" + (f" ({why})" if why else ""))
    return errors, changes


class ConfigRecord:
    """The checkpoint part ``config``: the run's config when saved; on load, the comparison.

    ``changes`` lists the keys the resumed run changed (applied); a frozen key raises.
    """

    def __init__(self, cfg: Config):
        self.current = to_dict(cfg)
        self.defaults = to_dict(type(cfg)())  # what a setting newer than the checkpoint behaved as
        self.changes: list[str] = []

    def state_dict(self) -> dict:
        return self.current

    def load_state_dict(self, saved: dict) -> None:
        if not isinstance(saved, dict):
            raise ValueError(f"config record: expected the saved config tree, got {type(saved).__name__}")
        errors, self.changes = compare(saved, self.current, self.defaults)
        if errors:
            raise ResumeConfigError("the resumed run changes what cannot change mid-run (start a new run in "
                                    "another logging.dir, or restore these values):\n  " + "\n  ".join(errors))

