#!/usr/bin/env bash
# What only a CUDA GPU can check, in one go, with every output kept in OUTDIR:
#   1. tests/test_cuda.py (flex_attention and dpokit_varlen kernels and training, 16-bit training,
#      QLoRA and 8-bit AdamW when bitsandbytes is installed, FSDP2 over NCCL, the memory plan against
#      the allocator);
#   2. the benchmark on the Qwen2.5-0.5B architecture in bfloat16, at 4, 32 and 64 pairs per step:
#      dpokit (defaults, gradient checkpointing on, torch_compile on, and its defaults under
#      dpokit_varlen, and at 4 pairs flex_attention) next to TRL's DPOTrainer, and torch.profiler
#      tables (where the time goes) of dpokit's 32-pair steps and of its compiled 64-pair steps;
#   3. the same benchmark's ablation columns (each speed switch off), without TRL.
# Usage: bash scripts/gpu_checks.sh [OUTDIR]   (after pip install -e ".[test,bench]"; default OUTDIR gpu-results)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-results}"
mkdir -p "$out"
status=0
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python -m pytest tests/test_cuda.py -v -rs 2>&1 | tee "$out/test_cuda.txt" || status=1
bench=(python benchmarks/dpo_vs_trl.py --device cuda --dtype bfloat16 --model-size 0.5b --skip-live)
columns=(--ablation dpokit-checkpointing dpokit-compile --also-attn dpokit_varlen)
"${bench[@]}" --steps 20 --warmup 5 "${columns[@]}" flex_attention --output "$out/bench-0.5b.json" 2>&1 | tee "$out/bench-0.5b.txt" || status=1
"${bench[@]}" --steps 10 --warmup 3 --pairs-per-step 32 "${columns[@]}" --profile --output "$out/bench-0.5b-32-pairs.json" 2>&1 \
    | tee "$out/bench-0.5b-32-pairs.txt" || status=1
"${bench[@]}" --steps 10 --warmup 3 --pairs-per-step 64 "${columns[@]}" --profile dpokit-compile --output "$out/bench-0.5b-64-pairs.json" 2>&1 \
    | tee "$out/bench-0.5b-64-pairs.txt" || status=1
"${bench[@]}" --steps 20 --warmup 5 --skip-trl --ablation --output "$out/bench-0.5b-ablation.json" 2>&1 | tee "$out/bench-0.5b-ablation.txt" || status=1
exit $status
