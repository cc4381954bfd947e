"""Child of the kill-during-save test: resume from ``latest`` if any, then save step after step forever."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from ckpt_state import fresh, make_state, parts_of, snapshot  # noqa: E402

from megatron_skpo.trainer.checkpoint import CheckpointManager  # noqa: E402


def main(root: str) -> int:
    mgr = CheckpointManager(root, save_interval=1, keep_last=2)
    objs = fresh()
    ck = mgr.restore(parts_of(objs))
    step = ck.step if ck else 0
    if ck is not None and snapshot(objs) != snapshot(make_state(step)):
        print(f"restored state of step {step} differs", flush=True)
        return 1
    print("ready", flush=True)
    while True:
        step += 1
        mgr.save(step, parts_of(make_state(step), slow=0.03))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
