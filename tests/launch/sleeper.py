"""Run by torchrun in the requeue test: the first run waits to be signalled, the requeued run exits."""
import os
import time

if __name__ == "__main__":
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    os.write(1, f"sleeper rank={os.environ['RANK']} restart={restart}\n".encode())
    if restart == 0:
        time.sleep(120)
