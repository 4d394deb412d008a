#!/usr/bin/env bash
# On the lent 2-GPU machine (nvidia-h200-x2), after `source scripts/gpu/unpack.sh`: the stage-2 step on one GPU
# and data-parallel on two (DDP over NCCL, as `accelerate launch` runs the training rules), same per-GPU batch,
# then the speed-up per row (issue 6's goal: >= 1.8x). JSON for both to $OUT.
# Usage: bash scripts/gpu/bench_two_gpus.sh [extra bench arguments]
set -uo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off (device KINDS.md)
args=(bench --batch-size 16 --seq-len 2048 --kl-chunk-tokens 4096 --stages stage2 --students softmax gdn
      --stage2-steps project cached --warmup 3 --repeats 5 "$@")
source "$(dirname "$0")/bench_lib.sh"  # for `rehearsing` (HD_REHEARSE): record both commands and stop
if rehearsing bench "${args[@]:1}" --out "$out/one_gpu.json"; then
  rehearsing bench "${args[@]:1}" --out "$out/two_gpus.json"; exit 0
fi
hybrid-distill "${args[@]}" --out "$out/one_gpu.json"
python3 -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
  --dynamo_backend no -m hybrid_distill.cli "${args[@]}" --out "$out/two_gpus.json"
python3 - "$out/one_gpu.json" "$out/two_gpus.json" <<'PY'
import json, sys
one, two = (json.load(open(path)) for path in sys.argv[1:])
for a, b in zip(one["rows"], two["rows"]):
    if a["tokens_per_s"] and b["tokens_per_s"]:
        print(f"{a['student']:8} {a['step']:8} 1 GPU {a['tokens_per_s']:9.0f} tok/s, 2 GPUs {b['tokens_per_s']:9.0f}"
              f" tok/s: {b['tokens_per_s'] / a['tokens_per_s']:.2f}x")
PY
