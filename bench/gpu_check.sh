#!/usr/bin/env bash
# The GPU path in one script: bf16 + torch.compile + fused AdamW + flash attention on GPT-2 small, with MFU
# against the bf16 matmul peak measured on the same device, and sampling at batch 1 and 64 (softar.decode beside
# Hugging Face generate on a GPT-2 of the same shape).
# Run from the repository root on a machine with one CUDA GPU and softar installed:  bash bench/gpu_check.sh
# Results land in ${OUT:-runs/gpu_check}/bench_train.json and bench_sample.json; see docs/gpu.md for what to expect.
set -euo pipefail
out=${OUT:-runs/gpu_check}
data=${DATA:-data/shakespeare_char}
[ -f "$data/meta.json" ] || softar prepare --out "$data"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
# the 124M shape; the character data is enough to time steps (vocab_size is padded to 50,304 either way)
softar bench train configs/gpt2_small.toml "data.dir=\"$data\"" train.batch_size=16 --steps 30 --out "$out"
softar bench train configs/gpt2_small.toml "data.dir=\"$data\"" train.compile=false --steps 30 --out "$out/eager"
softar bench sample configs/gpt2_small.toml "data.dir=\"$data\"" --new-tokens 200 --out "$out"
