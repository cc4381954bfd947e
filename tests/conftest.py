import os

import pytest
import torch

# Deterministic, single-threaded maths in tests: CI machines have 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
