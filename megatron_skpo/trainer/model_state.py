"""The model/optimizer checkpoint part of one rank.

Every rank ``torch.save``s its own model shard, the inner torch optimizer's state, its fp32
master weights (plain or distributed-optimizer shard) and the LR schedule, read back with
``torch.load(weights_only=True)``. Exact on CPU and at any TP/PP, but a resume needs the same
world size and parallel layout.

Weights that are not finite are never saved (the save raises, naming the first bad tensor), so a
diverged run cannot leave a NaN checkpoint behind. A resume takes the optimizer's moments and the
schedule's step count from the checkpoint, and the hyper-parameters (learning rate and its
schedule, weight decay, Adam betas and epsilon) from the current config: a changed ``optim.*``
applies from the resumed step on.
"""
from __future__ import annotations

from pathlib import Path

import torch


class ModelPart:
    """Model shard, optimizer (inner state + fp32 master weights) and LR schedule of one rank."""

    collective = True

    def __init__(self, policy, rank: int):
        self.policy, self.rank = policy, rank

    def _file(self, directory: Path) -> Path:
        return directory / f"rank_{self.rank:05d}.pt"

    def files(self, directory: Path) -> list[Path]:
        return [self._file(directory)]  # this rank's only: each rank verifies what it reads

    def _masters(self) -> list[torch.Tensor]:
        return [p for g in self.policy.optimizer.optimizer.param_groups for p in g["params"]]

    def save(self, directory: Path) -> None:
        p = self.policy
        for name, param in p.gpt.named_parameters():
            if not bool(torch.isfinite(param).all()):
                raise ValueError(f"refusing to save non-finite weights: {name} has NaN or inf values (the run "
                                 "diverged; resume from an earlier checkpoint with a smaller optim.lr)")
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
        fresh = [{k: g[k] for k in ("max_lr", "min_lr", "betas", "eps") if k in g}
                 for g in p.optimizer.optimizer.param_groups]
        p.optimizer.optimizer.load_state_dict(state["optimizer"])  # replaces the group dicts
        for group, mine in zip(p.optimizer.optimizer.param_groups, fresh, strict=True):
            group.update(mine)  # the saved groups carry the old hyper-parameters: the current config's win
        # the current config's schedule values win; only the step count comes from the checkpoint
        p.scheduler.override_opt_param_scheduler, p.scheduler.use_checkpoint_opt_param_scheduler = True, False
        p.scheduler.load_state_dict(state["scheduler"])
        p.scheduler.step(increment=0)  # re-apply lr and weight decay at the restored step
