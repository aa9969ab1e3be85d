#!/usr/bin/env bash
# The GPU check in one script (docs/gpu.md), about 5 minutes on one NVIDIA GPU, printing one JSON object:
#  - training GPT-2 small (124M) with bf16 autocast, torch.compile, fused AdamW and flash attention: MFU against the
#    bf16 matmul peak measured on the same device, and Hugging Face's GPT2LMHeadModel of the same shape beside it;
#  - decoding at batch 1 and 64 (softar.decode beside Hugging Face generate), in bf16 weights;
#  - a 1-GPU DDP run through torchrun (NCCL), as a smoke test of the multi-GPU path.
# Run from the repository root with softar installed ('softar[hf]' for the Hugging Face figures):  bash bench/gpu.sh
# Each part's JSON lands in ${OUT:-runs/gpu}; the summary is the last line of stdout.
set -euo pipefail
if ! command -v nvidia-smi >/dev/null || ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "bench/gpu.sh: error: no CUDA GPU here (nvidia-smi and torch.cuda.is_available() must both find one)" >&2
    exit 2
fi
out=${OUT:-runs/gpu}
data=${DATA:-data/shakespeare_char}
if [ -e "$out" ]; then echo "bench/gpu.sh: error: $out exists; set OUT to a new folder" >&2; exit 2; fi
[ -f "$data/meta.json" ] || softar prepare --out "$data" >/dev/null
# the 124M shape; character data is enough to time steps (the vocabulary is padded to 50,304 either way)
gpt2=(configs/gpt2_small.toml "data.dir=\"$data\"")
softar bench train "${gpt2[@]}" --dtypes bfloat16 --steps 30 --out "$out/train" >/dev/null
softar bench sample "${gpt2[@]}" --new-tokens 200 --out "$out/sample" >/dev/null
torchrun --standalone --nproc-per-node 1 -m softar train "${gpt2[@]}" train.parallel=ddp train.compile=false \
    train.max_iters=20 train.eval_interval=20 train.eval_iters=2 train.log_interval=10 --out "$out/ddp" \
    | tail -n 1 > "$out/ddp.json"
python - "$out" <<'PY'
import json, math, sys, torch
out = sys.argv[1]
train, sample, ddp = (json.load(open(f"{out}/{name}.json")) for name in ("train/bench_train", "sample/bench_sample", "ddp"))
print(json.dumps({
    "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
    "train_mfu_bf16_compiled": train["fraction_of_peak"], "train_tokens_per_s": train["tokens_per_s"],
    "matmul_peak_bf16_flops": train["matmul_peak_flops"], "train_first_step_s": train["first_step_s"],
    "train_speedup_over_hf": train.get("speedup_over_hf"),
    "decode_dtype": sample["dtype"], "decode_cuda_graphs": False,
    "decode_tokens_per_s_batch1": sample["tokens_per_s_batch1"], "decode_tokens_per_s_batch64": sample["tokens_per_s_batch64"],
    "decode_speedup_over_hf_batch1": sample.get("speedup_over_hf_batch1"),
    "decode_speedup_over_hf_batch64": sample.get("speedup_over_hf_batch64"),
    "ddp_world_size": ddp["world_size"], "ddp_val_loss": ddp["val_loss"], "ddp_finite": isinstance(ddp["val_loss"], float) and math.isfinite(ddp["val_loss"]),
}))
PY
