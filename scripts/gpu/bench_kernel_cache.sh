#!/usr/bin/env bash
# On the lent GPU machine, after `source scripts/gpu/unpack.sh`: what a short job pays to compile on a machine whose
# caches are cold, and what the workflow's shared kernel cache (config `kernel_cache`, hybrid_distill/kernel_cache.py)
# saves it. Each case is one `hybrid-distill bench` process shaped as a SmolLM2 scoring job (all-GDN, 16 x 512 tokens
# per step, 16 steps) with the paper configs' compile options and graphs; its wall time is a job's start-up plus its
# steps. The caches live under $HOME/.hd-kernel-cache, which lasts as long as the machine is held.
# Cases, run in the order given:
#   cold         every cache empty: the first job of a run, on any machine
#   shared       the same directories again: every later job, on any node, with the shared kernel cache
#   new_node     Triton's cache warm, Inductor's empty: a later job on another node with the libraries' defaults
#                (Inductor's cache in node-local /tmp). A lower bound of that cost: Inductor's own Triton kernels still
#                find their binaries in the warm Triton cache
#   default_first     the libraries' own defaults (Triton's and TileLang's caches under a home directory, Inductor's
#                     in node-local /tmp), all empty: the first job
#   default_new_node  the same home, a new Inductor directory: a later job on another node of a cluster whose home
#                     directory is shared, without the workflow's kernel cache
#   graphs_only  the same job without compile options (cuda_graphs alone), warm caches
#   eager        neither compile options nor graphs, warm caches
# Writes $OUT/<case>.json (the bench's rows and its compiled-graph cache counts) and appends one line per case to
# $OUT/wall.tsv.
# Usage: bash scripts/gpu/bench_kernel_cache.sh [cold] [shared] [new_node] [default_first] [default_new_node]
#        [graphs_only] [eager]
set -uo pipefail
out=${OUT:-bench-out}
root=$HOME/.hd-kernel-cache
mkdir -p "$out" "$root"
job=(--stages stage2 --students gdn --stage2-steps project --batch-size 16 --seq-len 512 --kl-chunk-tokens 4096
     --warmup 2 --repeats 14 ${HD_BENCH_EXTRA:-})  # HD_BENCH_EXTRA: e.g. "--shape num_hidden_layers=2" for a quick check
compiled=(--compile-blocks --compile-kl --bf16-weights --cuda-graph)
shared=(TRITON_CACHE_DIR="$root/shared/triton" TORCHINDUCTOR_CACHE_DIR="$root/shared/inductor"
        TRITON_CACHE_AUTOTUNING=1)
source "$(dirname "$0")/bench_lib.sh"  # for `rehearsing` (HD_REHEARSE)
case_run() {
  local name=$1 limit=$2; shift 2
  local environment=() arguments=()
  while [[ $1 != -- ]]; do environment+=("$1"); shift; done
  shift
  arguments=("$@")
  if [[ -n ${HD_REHEARSE:-} ]]; then  # record the command with its environment (scripts/gpu/rehearse.py)
    env "${environment[@]}" python "$(dirname "$0")/rehearse.py" record bench "${job[@]}" "${arguments[@]}" \
      --out "$out/$name.json"
    return
  fi
  echo "=== $name: ${environment[*]} ${arguments[*]}"
  local start end
  start=$(date +%s.%N)
  env "${environment[@]}" timeout "$limit" hybrid-distill bench "${job[@]}" "${arguments[@]}" --out "$out/$name.json" \
    > "$out/$name.log" 2>&1
  local status=$?
  end=$(date +%s.%N)
  python3 - "$name" "$status" "$start" "$end" "$out" <<'PY'
import json, pathlib, sys
name, status, start, end, out = sys.argv[1:]
path = pathlib.Path(out) / f"{name}.json"
result = json.loads(path.read_text()) if path.is_file() else {}
rows = result.get("rows") or [{}]
counts = result.get("compiled_graphs", {})
line = (f"{name}\texit {status}\twall {float(end) - float(start):.1f} s\t"
        f"tok/s {rows[0].get('tokens_per_s') or 0:,.0f}\t"
        f"graphs loaded {counts.get('inductor.fxgraph_cache_hit', 0)}\tcompiled {counts.get('inductor.fxgraph_cache_miss', 0)}")
print(line)
with open(pathlib.Path(out) / "wall.tsv", "a") as handle:
    handle.write(line + "\n")
PY
}
parts=("$@")
((${#parts[@]})) || parts=(cold shared)
for part in "${parts[@]}"; do
  case $part in
    cold) rm -rf "$root/shared"; case_run cold 330 "${shared[@]}" -- "${compiled[@]}" ;;
    shared) case_run shared 200 "${shared[@]}" -- "${compiled[@]}" ;;
    new_node) rm -rf "$root/node2"
      case_run new_node 260 TRITON_CACHE_DIR="$root/shared/triton" TORCHINDUCTOR_CACHE_DIR="$root/node2/inductor" \
        TRITON_CACHE_AUTOTUNING=1 -- "${compiled[@]}" ;;
    default_first) rm -rf "$root/home" "$root/node1"
      case_run default_first 330 -u TRITON_CACHE_DIR -u TRITON_CACHE_AUTOTUNING -u TILELANG_CACHE_DIR HOME="$root/home" \
        TORCHINDUCTOR_CACHE_DIR="$root/node1/inductor" -- "${compiled[@]}" ;;
    default_new_node) rm -rf "$root/node3"
      case_run default_new_node 260 -u TRITON_CACHE_DIR -u TRITON_CACHE_AUTOTUNING -u TILELANG_CACHE_DIR \
        HOME="$root/home" TORCHINDUCTOR_CACHE_DIR="$root/node3/inductor" -- "${compiled[@]}" ;;
    graphs_only) case_run graphs_only 200 "${shared[@]}" -- --cuda-graph ;;
    eager) case_run eager 200 "${shared[@]}" -- ;;
    *) rehearsing unknown_part "$0" "$part"
       echo "unknown part $part"; exit 2 ;;
  esac
done
