"""Child of test_bridge.py: rank 1 of a weight-broadcast group that receives, stalls or dies.

Usage: ``bridge_child.py PORT MODE OUT`` with MODE ``receive`` (save every received bucket to OUT),
``stall`` (join, then never take part) or ``die`` (join, then exit)."""
import sys
import time

import torch

from megatron_skpo.rollout.bridge import recv_buckets, weight_group

port, mode, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
pg = weight_group("127.0.0.1", port, 1, 2, timeout_s=20)
if mode == "receive":
    torch.save([[(n, t.clone()) for n, t in bucket] for bucket in recv_buckets(pg, 20)], out)
elif mode == "stall":
    time.sleep(60)
