#!/usr/bin/env bash
# On the lent GPU machine, after `source scripts/gpu/unpack.sh`: scoring jobs sharing one GPU. N bench processes
# at the workflow's scoring shapes (all-GDN stage-2 step, 16 x 512 tokens) start together, without and then with
# CUDA MPS (kernels of several processes run at once); the table sums their tokens/s. The table goes to stdout and
# $OUT/waves.txt, the processes' JSON and logs into $OUT/processes.tar.gz (a device call brings back 8 files).
# Usage: bash scripts/gpu/bench_shared_gpu.sh [process counts, default "1 4 8"] [extra bench arguments]
set -uo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
counts=${1:-"1 4 8"}
shift || true
step=(--stages stage2 --students gdn --stage2-steps project --batch-size 16 --seq-len 512 --kl-chunk-tokens 2048
      --warmup 3 --repeats 15 "$@")
source "$(dirname "$0")/bench_lib.sh"  # HD_REHEARSE: record one process's command per wave size, run nothing
if [[ -n ${HD_REHEARSE:-} ]]; then
  for count in $counts; do rehearsing bench "${step[@]}" --out "$out/off_n${count}_p1.json"; done
  exit 0
fi
runs=$(mktemp -d /tmp/hd-shared-gpu.XXXX)
export CUDA_MPS_PIPE_DIRECTORY=/tmp/hd-mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/hd-mps-log
wave() {  # mode, process count
  local mode=$1 count=$2 index
  for index in $(seq "$count"); do
    timeout 200 hybrid-distill bench "${step[@]}" --out "$runs/${mode}_n${count}_p$index.json" \
      > "$runs/${mode}_n${count}_p$index.log" 2>&1 &
  done
  wait
  python3 - "$runs" "$mode" "$count" <<'PY'
import glob, json, sys
out, mode, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.load(open(path))["rows"][0] for path in sorted(glob.glob(f"{out}/{mode}_n{count}_p*.json"))]
speeds = [row["tokens_per_s"] for row in rows if row["tokens_per_s"]]
peaks = [row["peak_mem_gb"] for row in rows if row["peak_mem_gb"]]
out_of_memory = sum(row["note"] == "out of memory" for row in rows)
print(f"{mode:6} {count:3} processes: {len(speeds)} finished ({out_of_memory} out of memory), "
      f"sum {sum(speeds):9.0f} tok/s, "
      f"each {min(speeds, default=0):7.0f}-{max(speeds, default=0):7.0f}, peak {max(peaks, default=0):5.1f} GB")
PY
  tar -C "$runs" -czf "$out/processes.tar.gz" .
}
for count in $counts; do wave off "$count" | tee -a "$out/waves.txt"; done
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
if command -v nvidia-cuda-mps-control > /dev/null && nvidia-cuda-mps-control -d; then
  for count in $counts; do wave mps "$count" | tee -a "$out/waves.txt"; done
  echo quit | nvidia-cuda-mps-control
else
  echo "no CUDA MPS on this machine (nvidia-cuda-mps-control missing or refused)" | tee -a "$out/waves.txt"
fi
true
