#!/usr/bin/env bash
# What only a CUDA GPU can check, in one go, with every output kept in OUTDIR:
#   1. tests/test_cuda.py (flex_attention and dpokit_varlen kernels and training, 16-bit training,
#      QLoRA and 8-bit AdamW when bitsandbytes is installed, FSDP2 over NCCL, DeepSpeed ZeRO-3 over NCCL
#      and its memory plan when DeepSpeed is installed, the memory plan against the allocator);
#   2. the benchmark on the Qwen2.5-0.5B architecture in bfloat16, at 4, 32 and 64 pairs per step:
#      dpokit (defaults, gradient checkpointing on, torch_compile on, float32 weights under bf16
#      autocast, and its defaults under dpokit_varlen, and at 4 pairs flex_attention) next to TRL's DPOTrainer, and torch.profiler
#      tables (where the time goes) of dpokit's 32-pair steps and of its compiled 64-pair steps (32 and 64
#      pairs with metrics logged every 10 steps, as both frameworks train by default);
#   3. the same benchmark's ablation columns (each speed switch off), without TRL;
#   4. dpokit against TRL as a user who tunes it runs it (precompute_ref_log_probs; sdpa kept off
#      cuDNN as dpokit keeps it), at 4 and 32 pairs per step (parts trl-tuned, trl-tuned-32).
# Usage: bash scripts/gpu_checks.sh [OUTDIR [PART ...]]   (after pip install -e ".[test,bench]")
#   OUTDIR defaults to gpu-results; PARTs (default: all, in this order, ~20 minutes on an H100):
#   tests (kernels, log-probs, the memory plan), tests-training (the tests that train), 4-pairs, 32-pairs,
#   64-pairs, ablation, trl-tuned, trl-tuned-32. Each part takes a few minutes, so a session with
#   a time limit per command can run them one or two at a time into the same OUTDIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-results}"
shift || true
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests tests-training 4-pairs 32-pairs 64-pairs ablation trl-tuned trl-tuned-32)
mkdir -p "$out"
status=0
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
bench=(python benchmarks/dpo_vs_trl.py --device cuda --dtype bfloat16 --model-size 0.5b --skip-live)
columns=(--ablation dpokit-checkpointing dpokit-compile dpokit-autocast --also-attn dpokit_varlen)
# at 32 and 64 pairs both frameworks log every 10 steps, their default, so the host copies metrics (a GPU
# synchronisation) once per 10 steps as in training, and each step is timed as its row's average; 4 pairs
# keeps per-step rows, whose token counts benchmarks/plan_vs_measured.py needs
logged=(--steps 40 --warmup 10 --logging-steps 10)
# the tests that train (tiny runs, a QLoRA one, FSDP2 and DeepSpeed launches): their own part, so each part stays
# within a few minutes
trainings="training or trains or refuses_float32 or fsdp2 or deepspeed"
for part in "${parts[@]}"; do
  case $part in
    tests) python -m pytest tests/test_cuda.py -v -rs -k "not ($trainings)" 2>&1 | tee "$out/test_cuda.txt" || status=1 ;;
    tests-training) python -m pytest tests/test_cuda.py -v -rs -k "$trainings" 2>&1 | tee "$out/test_cuda_training.txt" || status=1 ;;
    4-pairs) "${bench[@]}" --steps 20 --warmup 5 "${columns[@]}" flex_attention --output "$out/bench-0.5b.json" 2>&1 \
        | tee "$out/bench-0.5b.txt" || status=1 ;;
    32-pairs) "${bench[@]}" "${logged[@]}" --pairs-per-step 32 "${columns[@]}" --profile --output "$out/bench-0.5b-32-pairs.json" 2>&1 \
        | tee "$out/bench-0.5b-32-pairs.txt" || status=1 ;;
    64-pairs) "${bench[@]}" "${logged[@]}" --pairs-per-step 64 "${columns[@]}" --profile dpokit-compile \
        --output "$out/bench-0.5b-64-pairs.json" 2>&1 | tee "$out/bench-0.5b-64-pairs.txt" || status=1 ;;
    ablation) "${bench[@]}" --steps 20 --warmup 5 --skip-trl --ablation --output "$out/bench-0.5b-ablation.json" 2>&1 \
        | tee "$out/bench-0.5b-ablation.txt" || status=1 ;;
    trl-tuned) "${bench[@]}" --steps 20 --warmup 5 --trl-variants trl-precompute trl-no-cudnn \
        --output "$out/bench-0.5b-trl-tuned.json" 2>&1 | tee "$out/bench-0.5b-trl-tuned.txt" || status=1 ;;
    trl-tuned-32) "${bench[@]}" "${logged[@]}" --pairs-per-step 32 --trl-variants trl-precompute trl-no-cudnn \
        --output "$out/bench-0.5b-32-pairs-trl-tuned.json" 2>&1 | tee "$out/bench-0.5b-32-pairs-trl-tuned.txt" || status=1 ;;
    *) echo "unknown part '$part' (tests, tests-training, 4-pairs, 32-pairs, 64-pairs, ablation, trl-tuned, trl-tuned-32)" >&2; exit 2 ;;
  esac
done
exit $status
