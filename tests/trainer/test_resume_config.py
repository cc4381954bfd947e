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


def test_a_setting_newer_than_the_checkpoint_resumes_at_its_default():
    """A checkpoint saved before a (frozen) setting existed resumes when the setting keeps its default
    (the older release behaved so), and refuses when it is set to anything else."""
    saved = ConfigRecord(load_config(None)).state_dict()
    del saved["algo"]["skpo"]["unseen_length"]
    record = ConfigRecord(load_config(None))
    record.load_state_dict(saved)
    assert record.changes == []
    with pytest.raises(ResumeConfigError, match=r"algo.skpo.unseen_length: '<absent>' -> 'dataset_mean'"):
        ConfigRecord(load_config(None, ["algo.skpo.unseen_length=dataset_mean"])).load_state_dict(saved)


def test_a_refused_resume_is_not_called_a_damaged_checkpoint(tmp_path):
    """The checkpoint is sound; the new config cannot resume it: the error says so and does not advise
    moving the checkpoint away."""
    from megatron_skpo.trainer.checkpoint import CheckpointError, CheckpointManager
    from megatron_skpo.trainer.parts import JsonPart

    ckpt = CheckpointManager(tmp_path, 1, 3)
    ckpt.save(1, {"config": JsonPart(ConfigRecord(load_config(None)))})
    ckpt.save(2, {"config": JsonPart(ConfigRecord(load_config(None)))})
    with pytest.raises(CheckpointError) as e:
        ckpt.restore({"config": JsonPart(ConfigRecord(load_config(None, ["algo.group_size=4"])))})
    msg = str(e.value)
    assert msg.startswith(f"cannot resume from {tmp_path / 'step_00000002'}: the resumed run changes what cannot")
    assert "algo.group_size: 8 -> 4" in msg and "damaged" not in msg
