"""pass@k (vs a brute-force reference), summaries, and the runner's resume logic with a scripted generator."""
import itertools
import json

import pytest
import torch

from megatron_skpo.eval import Completion, EvalSettings, evaluate, pass_at_k, read_records, summarize
from megatron_skpo.eval.model import resolve_model


@pytest.mark.parametrize("n,c,k,expected", [
    (2, 1, 1, 0.5), (2, 1, 2, 1.0), (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 0, 3, 0.0), (5, 5, 1, 1.0), (10, 3, 1, 0.3),
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in range(1, 7) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_matches_enumeration(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_summarize_hand_values():
    recs = [{"correct": [True, False], "statuses": ["correct", "incorrect"], "lengths": [10, 30], "truncated": [False, True]},
            {"correct": [False, False], "statuses": ["no_answer", "timeout"], "lengths": [20, 40], "truncated": [False, False]}]
    s = summarize("toy", recs, k=2)
    assert (s.avg_at_k, s.pass_at_k, s.mean_response_tokens) == (0.25, 0.5, 25.0)
    assert (s.truncation_rate, s.no_answer_rate, s.grading_timeouts) == (0.25, 0.25, 1)


class ScriptedGenerator:
    """Sample j of each prompt: the gold answer boxed when j == 0, a wrong one otherwise."""

    def __init__(self, golds_by_prompt):
        self.golds, self.calls = golds_by_prompt, []

    def generate(self, prompts, n, max_tokens, temperature, top_p, stop=(), seed=None):
        self.calls.append(len(prompts))
        return [[Completion(f"\\boxed{{{self.golds[p]}}}" if j == 0 else "\\boxed{-12345}", 5 + j, j == 1)
                 for j in range(n)] for p in prompts]


@pytest.fixture()
def gsm8k_golds():
    from megatron_skpo.data import load_recipe, render

    problems, _ = load_recipe("gsm8k", limit=6)
    return {render(p, "raw", use_chat_template=False): p.answer for p in problems}


def test_evaluate_writes_table_and_resumes(tmp_path, gsm8k_golds):
    settings = EvalSettings(model="scripted", k=2, prompt_template="raw", use_chat_template=False)
    gen = ScriptedGenerator(gsm8k_golds)
    [s] = evaluate(["gsm8k"], gen, None, settings, tmp_path, limit=6, workers=1, progress=False)
    assert (s.problems, s.avg_at_k, s.pass_at_k, s.truncation_rate, s.mean_response_tokens) == (6, 0.5, 1.0, 0.5, 5.5)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["benchmarks"][0]["avg_at_k"] == 0.5
    assert "| gsm8k | 6 | 50.0 | 100.0 |" in (tmp_path / "summary.md").read_text()
    # Simulate a crash: keep 4 records and a torn fifth line; the rerun regenerates the chunk holding the 2
    # missing problems whole (all 6 here: one chunk), as the uninterrupted run did, and records only those 2.
    path = tmp_path / "gsm8k.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:4]) + lines[4][:20])
    gen2 = ScriptedGenerator(gsm8k_golds)
    [s2] = evaluate(["gsm8k"], gen2, None, settings, tmp_path, limit=6, workers=1, progress=False)
    assert gen2.calls == [6] and s2 == s
    assert len(read_records(path)) == 6 and len(path.read_text().splitlines()) == 6
    with pytest.raises(ValueError, match="other settings"):
        evaluate(["gsm8k"], gen2, None, EvalSettings(model="scripted", k=4, prompt_template="raw",
                                                      use_chat_template=False), tmp_path, limit=6, progress=False)


def test_resolve_model(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert resolve_model(tmp_path / "hf") == tmp_path / "hf"
    with pytest.raises(FileNotFoundError, match="not an HF directory"):
        resolve_model(tmp_path / "nothing")


def test_resolve_model_converts_a_megatron_checkpoint(tmp_path):
    """A Megatron checkpoint given to --model is converted once to an HF directory (bit-exact)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from checkpoint_convert.convert import hf_to_mcore

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=64, num_hidden_layers=2, vocab_size=256, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", tp=1, pp=1, dtype="fp32")
    out = resolve_model(tmp_path / "mcore", cache_dir=tmp_path / "cache")
    assert out == tmp_path / "cache" / "mcore-hf" and (out / "config.json").is_file()
    src = load_file(tmp_path / "hf" / "model.safetensors")
    back = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert set(back) >= set(src) and all(torch.equal(src[k], back[k]) for k in src)
    assert resolve_model(tmp_path / "mcore", cache_dir=tmp_path / "cache") == out  # cached, no rework
    with pytest.raises(FileNotFoundError, match="not an HF directory"):
        resolve_model(tmp_path / "nothing")
