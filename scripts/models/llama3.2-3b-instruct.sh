# Llama-3.2-3B-Instruct with the SKPO recipe (configs/skpo.yaml): sourced by scripts/run_llama3b.sh,
# scripts/convert.sh and scripts/eval.sh. Override the paths with MODEL_HF_PATH / DATA_PATH.
MODEL_NAME=llama3.2-3b-instruct
MODEL_RECIPE=configs/skpo.yaml
MODEL_TP=1                      # 3B fits one GPU with its optimizer state: all GPUs data-parallel
MODEL_PP=1
MODEL_HF_PATH=${MODEL_HF_PATH:-checkpoints/Llama-3.2-3B-Instruct}
MODEL_ARGS=(
  "model.hf_path=$MODEL_HF_PATH"
  model.dtype=bf16
  "data.train.path=${DATA_PATH:-data/dapo-math-17k.parquet}"
  data.use_chat_template=true   # an instruct model: prompts go through its chat template
  rollout.tp=1
  rollout.max_prompt_tokens=1024
  rollout.max_response_tokens=3072
  rollout.gpu_memory_utilization=0.5
)
EVAL_ARGS=(--prompt-template qwen_math --max-tokens 3072 --max-model-len 4096 --temperature 0.6 --k 4)
