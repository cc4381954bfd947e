# Qwen2.5-Math-7B with the paper's SKPO settings (configs/skpo.yaml): sourced by scripts/run_7b.sh,
# scripts/convert.sh and scripts/eval.sh. Override the paths with MODEL_HF_PATH / DATA_PATH.
MODEL_NAME=qwen2.5-math-7b
MODEL_RECIPE=configs/skpo.yaml
MODEL_TP=2                      # 7B at bf16 with fp32 master weights: TP=2 per 80 GB pair
MODEL_PP=1
MODEL_HF_PATH=${MODEL_HF_PATH:-checkpoints/Qwen2.5-Math-7B}
MODEL_ARGS=(
  "model.hf_path=$MODEL_HF_PATH"
  model.dtype=bf16
  "data.train.path=${DATA_PATH:-data/dapo-math-17k.parquet}"
  rollout.tp=1                  # one vLLM engine per GPU: the 7B fits, and generation is the bottleneck
  rollout.max_prompt_tokens=1024
  rollout.max_response_tokens=3072
  rollout.gpu_memory_utilization=0.5
)
# skpo-eval settings of this model (scripts/eval.sh)
EVAL_ARGS=(--prompt-template qwen_math --max-tokens 3072 --max-model-len 4096 --temperature 0.6 --k 4)
