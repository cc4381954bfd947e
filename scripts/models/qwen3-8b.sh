# Qwen3-8B (base) with the SKPO recipe (configs/skpo.yaml): sourced by a run script, scripts/convert.sh
# and scripts/eval.sh. Override the paths with MODEL_HF_PATH / DATA_PATH (the post-trained Qwen3-8B
# works too: add data.use_chat_template=true and give its thinking longer rollout.max_response_tokens).
MODEL_NAME=qwen3-8b
MODEL_RECIPE=configs/skpo.yaml
# Layout on 8 x 80 GB: TP=2, PP=1, so DP=4. Per GPU (8.2B params / TP 2): bf16 weights 8 GB, fp32
# gradient buffer 16 GB, fp32 master + Adam moments sharded over the 4 DP ranks 12 GB: ~37 GB plus
# activations, leaving room for the colocated vLLM engine below. TP=1 would need ~90 GB before
# activations; PP would only add pipeline bubbles at this size. Estimates, not measured here.
MODEL_TP=2
MODEL_PP=1
MODEL_HF_PATH=${MODEL_HF_PATH:-checkpoints/Qwen3-8B-Base}
MODEL_ARGS=(
  "model.hf_path=$MODEL_HF_PATH"
  model.dtype=bf16
  "data.train.path=${DATA_PATH:-data/dapo-math-17k.parquet}"
  rollout.tp=1                  # one engine per GPU: 16 GB of bf16 weights + KV cache fit in 0.4 x 80 GB
  rollout.max_prompt_tokens=1024
  rollout.max_response_tokens=3072
  rollout.gpu_memory_utilization=0.4
)
# skpo-eval settings of this model (scripts/eval.sh)
EVAL_ARGS=(--prompt-template qwen_math --max-tokens 3072 --max-model-len 4096 --temperature 0.6 --k 4)
