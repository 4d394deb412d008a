#!/usr/bin/env bash
# On the lent GPU machine, after `source scripts/gpu/unpack.sh`: the stage-2 step at SmolLM2-135M shapes with
# each speed/memory option, one bench run per option set (a failing option cannot take the others down), and
# the workflow's own shapes (configs/smollm2-gpu.yaml) with the teacher cache. Tables to stdout, JSON to $OUT.
# Usage: bash scripts/gpu/bench_stage2_options.sh [bench arguments that override every run's, e.g. --warmup 5]
set -uo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
overrides=("$@")
common=(--stages stage2 --students softmax gdn --warmup 3 --repeats 5)
source "$(dirname "$0")/bench_lib.sh"  # for `rehearsing` (HD_REHEARSE); this script's `bench` takes no time limit
bench() {  # name, then bench arguments
  local name=$1; shift
  rehearsing bench "${common[@]}" "$@" "${overrides[@]}" --out "$out/$name.json" && return
  echo "=== $name: $*"
  hybrid-distill bench "${common[@]}" "$@" "${overrides[@]}" --out "$out/$name.json" 2>&1 | grep -vE "^\s*$|it/s\]|batch/s\]| INFO "
}
# 32k tokens per step: the memory goal's size.
bench b16x2048_plain --batch-size 16 --seq-len 2048 --kl-chunk-tokens 4096 --stage2-steps naive project cached \
  --profile-top 8
bench b16x2048_ckpt --batch-size 16 --seq-len 2048 --kl-chunk-tokens 4096 --stage2-steps project cached \
  --activation-checkpointing
bench b16x2048_compile --batch-size 16 --seq-len 2048 --kl-chunk-tokens 4096 --stage2-steps project cached \
  --compile-blocks --profile-top 8
bench b16x2048_ckpt_compile --batch-size 16 --seq-len 2048 --kl-chunk-tokens 4096 --stage2-steps project cached \
  --activation-checkpointing --compile-blocks
# The KL's per-chunk maths compiled too (distill.compile_kl).
bench b16x2048_compile_kl --batch-size 16 --seq-len 2048 --kl-chunk-tokens 4096 --stage2-steps project cached \
  --compile-blocks --compile-kl --gemm-ceiling
# 64k tokens per step, which only fits with recomputation.
bench b32x2048_ckpt_compile --batch-size 32 --seq-len 2048 --kl-chunk-tokens 8192 --stage2-steps project cached \
  --activation-checkpointing --compile-blocks
# The workflow run's shapes: is the teacher cache worth it there?
bench b16x512_workflow --batch-size 16 --seq-len 512 --kl-chunk-tokens 2048 --stage2-steps project cached
true
