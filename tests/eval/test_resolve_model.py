"""Which HF model an skpo-train checkpoint started from (the export's config and tokenizer)."""
import json

from megatron_skpo.eval.model import _trained_from


def test_trained_from_reads_the_checkpoints_config(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    step = tmp_path / "checkpoints" / "step_00000004"
    (step / "config").mkdir(parents=True)
    (step / "config" / "state.json").write_text(json.dumps({"model": {"hf_path": str(base)}}))
    assert _trained_from(step) == base
    (step / "config" / "state.json").write_text(json.dumps({"model": {"hf_path": str(tmp_path / "gone")}}))
    assert _trained_from(step) is None  # moved or deleted: the checkpoint must then carry its hf/ side files
    (step / "config" / "state.json").write_text("{not json")
    assert _trained_from(step) is None
    assert _trained_from(tmp_path / "nothing") is None
