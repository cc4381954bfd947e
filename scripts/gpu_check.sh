#!/usr/bin/env bash
# Every GPU check and benchmark of the Megatron policy, in one run; prints a short table last.
#
#   bash scripts/gpu_check.sh            # from the repository root, on a machine with one GPU
#
# The GPU image has torch + CUDA, transformers and Python 3.12 but no megatron-core. Carry a
# megatron-core wheel in .whl/ (the script installs it with --no-deps; it needs only numpy and
# packaging, which the image has). Make it on a machine with network access:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 megatron-core==0.16.1 -d .whl
# (any release >= 0.16.1 works). Results (one JSON line per check) go to $OUT/gpu_check.jsonl when
# $OUT is set, else to ./gpu_check.jsonl. Checks, all with random weights:
#   1. HF vs Megatron logits (tiny Llama with Llama-3 rope scaling, tiny Qwen2 tied), fp32, TF32 off;
#   2. fused vs naive log-prob/entropy numerics on GPU (fp32 and bf16);
#   3. skpo-bench logprob at the Qwen2.5-1.5B and -7B output-layer shapes (bf16, 8192 tokens);
#   4. skpo-bench step: Qwen2.5-1.5B (all 28 layers) and Qwen2.5-7B per-layer shape (4 layers:
#      the full 7B with fp32 master weights and Adam state does not fit one 80 GB GPU);
#   5. skpo-bench transport: the disaggregated placement's weight broadcast to a rollout worker, 2 GB of
#      bf16 in 512 MB buckets, over NCCL from GPU to GPU (needs 2 GPUs: one per process, NCCL refuses
#      two ranks on one device) and over gloo from host memory.
# Not here: the overlapped (rollout.max_staleness=1) step itself needs vLLM, which the GPU image lacks
# and which is too large to carry; it runs on CPU in the test suite and in skpo-bench overlap.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out_dir="${OUT:-.}"
results="$out_dir/gpu_check.jsonl"
: > "$results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
py="${PYTHON:-python3}"

if ! "$py" -c "import megatron.core" 2>/dev/null; then
  wheel=$(ls .whl/megatron_core-*.whl 2>/dev/null | head -n 1)
  if [ -z "$wheel" ]; then
    echo "megatron-core is not installed and no wheel is in .whl/ (see the header of this script)" >&2
    exit 2
  fi
  "$py" -m pip install --no-deps --quiet "$wheel" || exit 2
fi
"$py" -c "import torch; assert torch.cuda.is_available(), 'no GPU'; print(torch.cuda.get_device_name())" || exit 2

run() {  # run NAME CMD...: append the command's JSON line (or a failure record) to $results
  local name="$1"; shift
  local line
  if line=$("$@" 2> "$out_dir/gpu_check_$name.err" | tail -n 1) && [ -n "$line" ]; then
    echo "$line" | "$py" -c "import json,sys; r=json.loads(sys.stdin.read()); r['check']='$name'; print(json.dumps(r))" >> "$results"
  else
    echo "{\"check\": \"$name\", \"error\": \"see gpu_check_$name.err\"}" >> "$results"
  fi
}

parity() {
  "$py" - <<'EOF'
import json, os, torch, torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
os.environ.setdefault("MASTER_ADDR", "127.0.0.1"); os.environ.setdefault("MASTER_PORT", "29611")
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1)
from megatron_skpo.model.builder import build_gpt_model, initialize_parallel
from megatron_skpo.model.weights import load_hf
initialize_parallel(1, 1, seed=0)
common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, attn_implementation="eager")
cases = {"llama": (LlamaForCausalLM, LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
             "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 64})),
         "qwen2": (Qwen2ForCausalLM, Qwen2Config(**common, tie_word_embeddings=True))}
out = {"bench": "hf_parity"}
for name, (cls, cfg) in cases.items():
    torch.manual_seed(0)
    hf = cls(cfg).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = build_gpt_model(cfg.to_dict(), impl="local").cuda().eval()
    load_hf(model, {k: v.cuda() for k, v in hf.state_dict().items()}, cfg.to_dict())
    hf = hf.cuda()
    tokens = torch.randint(0, 1000, (2, 128), device="cuda")
    pos = torch.arange(128, device="cuda")[None].expand(2, 128)
    with torch.no_grad():
        diff = (model(tokens, pos, None)[..., :1000] - hf(tokens).logits).abs().max().item()
    out[f"{name}_max_abs_diff"] = diff
out["ok"] = all(v <= 1e-4 for k, v in out.items() if k.endswith("diff"))
print(json.dumps(out))
EOF
}

run hf_parity parity
bench="$py -m megatron_skpo.cli.bench"
run numerics_fp32 $bench logprob --tokens 4096 --hidden 1024 --vocab 32768 --dtype fp32 --chunk 512
run numerics_bf16 $bench logprob --tokens 4096 --hidden 1024 --vocab 32768 --dtype bf16 --chunk 512
run logprob_1.5b $bench logprob --tokens 8192 --hidden 1536 --vocab 151936 --dtype bf16 --chunk 2048
run logprob_7b $bench logprob --tokens 8192 --hidden 3584 --vocab 152064 --dtype bf16 --chunk 2048
run logprob_7b_tp4 $bench logprob --tokens 8192 --hidden 3584 --vocab 152064 --dtype bf16 --chunk 4096 --tp 4
run step_1.5b $bench step --model qwen2.5-1.5b --seq-len 2048 --micro-batch-tokens 8192 --micro-batches 2 --steps 3
run step_7b_4layers $bench step --model qwen2.5-7b --layers 4 --seq-len 2048 --micro-batch-tokens 8192 --micro-batches 2 --steps 3
if [ "$("$py" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  run transport_nccl $bench transport --backend nccl --size-gb 2 --bucket-mb 512
else
  echo '{"check": "transport_nccl", "error": "skipped: NCCL needs 2 GPUs (one per process)"}' >> "$results"
fi
run transport_gloo $bench transport --backend gloo --size-gb 2 --bucket-mb 512

"$py" - "$results" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def fmt(x):
    return "-" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))
print(f"\n{'check':<18} {'result':<70}")
for r in rows:
    c = r["check"]
    if "error" in r:
        s = "FAILED: " + r["error"]
    elif r.get("bench") == "hf_parity":
        s = f"llama diff {fmt(r['llama_max_abs_diff'])}, qwen2 diff {fmt(r['qwen2_max_abs_diff'])}, ok={r['ok']}"
    elif r.get("bench") == "transport":
        s = f"{r['backend']}: {r['bytes']/1e9:.2f} GB in {fmt(r['seconds'])}s = {fmt(r['GBps'])} GB/s"
    elif r.get("bench") == "logprob":
        s = (f"fused {fmt(r['fused_seconds'])}s/{r['fused_peak_bytes']/2**20:.0f}MiB vs naive "
             f"{fmt(r['naive_seconds'])}s/{r['naive_peak_bytes']/2**20:.0f}MiB, max|dlogp| {fmt(r['max_abs_diff_logp'])}")
    else:
        s = (f"{fmt(r['tokens_per_second'])} tok/s, MFU {fmt(r['mfu'])}, step {fmt(r['step_seconds'])}s, "
             f"peak {(r['peak_memory_bytes'] or 0)/2**30:.1f}GiB")
    print(f"{c:<18} {s}")
EOF
