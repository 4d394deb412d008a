#!/usr/bin/env bash
# On the lent GPU machine, after `source scripts/gpu/unpack.sh`: run the workflow for a config in the background
# (it outlives this device call; the next call, made within the 30 s the machine stays warm, picks it up),
# wait up to WAIT seconds, report progress, and pack every small result (no weights, no data) into $OUT.
# Usage: bash scripts/gpu/run_workflow.sh WAIT CONFIG [snakemake args...]
set -uo pipefail
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # fewer fragmentation OOMs when jobs share a GPU
wait_s=$1 config=$2; shift 2
run=$(python3 -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['run'])" "$config")
state=$HOME/.hd-run/$run
mkdir -p "$state"
running() { [[ -f $state/pid ]] && kill -0 "$(cat "$state/pid")" 2>/dev/null; }
if ! running && [[ ! -f $state/rc || $(cat "$state/rc") != 0 ]]; then
  [[ -f $state/started ]] || date +%s > "$state/started"
  rm -f "$state/rc"
  setsid nohup bash -c 'snakemake --profile profiles/gpu-workstation "${@:2}" --configfile "$0"; echo $? > "$1/rc"' \
    "$config" "$state" "$@" >> "$state/snakemake.log" 2>&1 < /dev/null &
  echo $! > "$state/pid"
  echo "run_workflow: started snakemake (pid $!)"
fi
deadline=$((SECONDS + wait_s))
while running && ((SECONDS < deadline)); do sleep 5; done
grep -E "steps \([0-9]+%\) done" "$state/snakemake.log" | tail -1
grep -E "^Error in rule|Exiting because" "$state/snakemake.log" | tail -5
for failed in $(grep -A12 "^Error in rule" "$state/snakemake.log" | grep -oE "log: \S+" | cut -d' ' -f2 | sort -u); do
  echo "== tail of $failed"; tail -5 "$failed"
done
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
elapsed=$(( $(date +%s) - $(cat "$state/started") ))
if [[ -f $state/rc ]]; then echo "run_workflow: snakemake exited $(cat "$state/rc") after ${elapsed}s"
else echo "run_workflow: still running after ${elapsed}s"; fi
if [[ -n ${OUT:-} ]]; then
  echo "$elapsed" > "$state/elapsed_s"
  tar -czf "$OUT/$run-results.tar.gz" --exclude='*.safetensors' --exclude='*.bin' --exclude='*/state' \
    --exclude='*/state/*' -C . "results/$run" -C "$state" snakemake.log elapsed_s 2>/dev/null
  ls -la "$OUT"
fi
