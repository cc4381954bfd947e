# Qwen3-30B-A3B (base; 128 experts, top-8, 3.3B active) with the SKPO recipe (configs/skpo.yaml):
# sourced by a run script, scripts/convert.sh and scripts/eval.sh. Override the paths with
# MODEL_HF_PATH / DATA_PATH.
MODEL_NAME=qwen3-30b-a3b
MODEL_RECIPE=configs/skpo.yaml
# Layout on 8 x 80 GB per node: TP=1, PP=1, EP=8. The experts (29.0B of the 30.5B params) are split
# 16 per GPU over the node (the token all-to-all stays on NVLink); the dense 1.5B (attention,
# embeddings, routers) is data-parallel, and attention with 4 KV heads of 128 gains nothing from
# TP (MoE at TP > 1 would also need sequence parallelism). Per GPU: bf16 weights 10 GB, fp32
# gradient buffer 21 GB, and fp32 master + Adam moments of the 16 local experts 44 GB divided by
# the expert-data-parallel size (DP / EP). One node (expert-DP 1) therefore needs ~77 GB before
# activations and vLLM, which does not fit: run 2 nodes (DP=16, expert-DP 2: ~55 GB) or more with
# this same layout. Estimates, not measured here (no GPU in this repository's CI).
MODEL_TP=1
MODEL_PP=1
MODEL_EP=8
MODEL_HF_PATH=${MODEL_HF_PATH:-checkpoints/Qwen3-30B-A3B-Base}
MODEL_ARGS=(
  "model.hf_path=$MODEL_HF_PATH"
  model.dtype=bf16
  "parallel.ep=$MODEL_EP"
  "data.train.path=${DATA_PATH:-data/dapo-math-17k.parquet}"
  rollout.tp=4                  # 61 GB of bf16 weights: a quarter per GPU + KV cache in 0.3 x 80 GB
  rollout.max_prompt_tokens=1024
  rollout.max_response_tokens=3072
  rollout.gpu_memory_utilization=0.3
)
# skpo-eval settings of this model (scripts/eval.sh)
EVAL_ARGS=(--prompt-template qwen_math --max-tokens 3072 --max-model-len 4096 --temperature 0.6 --k 4)  # one GPU holds the 61 GB
