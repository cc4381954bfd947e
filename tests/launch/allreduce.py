"""Run by torchrun under the Slurm test: a gloo all-reduce proves the c10d rendezvous worked."""
import os

import torch
import torch.distributed as dist

if __name__ == "__main__":
    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    line = (f"allreduce rank={dist.get_rank()} world={dist.get_world_size()} sum={t.item():g} "
            f"node_rank={os.environ['GROUP_RANK']}\n")
    os.write(1, line.encode())  # one write: the ranks share the job's output file
    dist.destroy_process_group()
