"""The resumed run's config against the one its checkpoint recorded: frozen keys refuse, the rest
are applied and announced."""
import pytest

from megatron_skpo.config import load_config, to_dict
from megatron_skpo.trainer.resume import ConfigRecord, ResumeConfigError, compare, frozen_reason


def test_frozen_and_mutable_keys():
    assert frozen_reason("algo.name") and frozen_reason("algo.skpo.w_up") and frozen_reason("parallel.ep")
    assert frozen_reason("parallel.distributed_optimizer")
    # the model and optimizer are one Megatron dist checkpoint: TP and PP reshard on resume
    assert frozen_reason("parallel.tp") is None and frozen_reason("parallel.pp") is None
    assert frozen_reason("model.hf_path") and frozen_reason("data.train.path") and frozen_reason("train.seed")
    assert frozen_reason("optim.lr") is None and frozen_reason("train.steps") is None
    assert frozen_reason("model.logprob_chunk_size") is None and frozen_reason("logging.dir") is None


def test_compare_lists_every_difference_once():
    saved = to_dict(load_config(None, ["optim.lr=1e-6"]))
    now = to_dict(load_config(None, ["optim.lr=2e-6", "train.steps=900", "algo.group_size=4"]))
    errors, changes = compare(saved, now)
    assert errors == ["algo.group_size: 8 -> 4 (the saved trackers and the sampler's groups were built with this G)"]
    assert changes == ["optim.lr: 1e-06 -> 2e-06", "train.steps: 500 -> 900"]


def test_record_refuses_another_algorithm_and_accepts_a_new_lr():
    saved = ConfigRecord(load_config(None)).state_dict()
    record = ConfigRecord(load_config(None, ["optim.lr=3e-6"]))
    record.load_state_dict(saved)
    assert record.changes == ["optim.lr: 1e-06 -> 3e-06"]
    with pytest.raises(ResumeConfigError, match="algo.name: 'skpo' -> 'grpo'"):
        ConfigRecord(load_config(None, ["algo.name=grpo"])).load_state_dict(saved)
