#!/usr/bin/env bash
# On the lent GPU machine, after `source scripts/gpu/unpack.sh`: the GPU checks and benches of what sessions 22-25
# built without a GPU (docs/performance.md, "The next GPU lease"), one part per device call, each within about
# 560 s, its logs and JSON under $OUT/<part>/ (a killed call keeps what finished; at most 8 files come back).
# Parts, in the order to run them (docs/performance.md, "The next GPU lease"; staging and the first two fit one
# 30-minute lease; the checks of a change come before it becomes a default):
#   decide        the speed of each change in one call: the graphed all-GDN step at 64 x 512 by default, with fla's
#                 chunk states kept, with our KL kernel, with the teacher on its own stream, and with all three
#                 (tokens/s only, no profile), then compare_benches.py's table against the default
#   conv_tests    every conv GPU test: our row and tiled kernels against PyTorch's conv, every autotune candidate
#                 (both read-ahead walks), the mixers with our conv; then one conv call timed (rows, tiles, fla)
#   kl_rows       HD_KL_ROWS=triton: the compiled-KL GPU tests (our kernel against Inductor's maths, every autotune
#                 candidate, a graph replay), then the graphed all-GDN (every kernel listed) and all-softmax steps
#   kept_states   HD_GDN_KEEP_STATES: its tests against fla's own rule, then the graphed all-GDN step with it
#   stream_tests  the replayed-step tests: the teacher on its own stream, and head_dim 128 (FlashQLA captured)
#   conv_bench    graphed all-GDN step at 64 x 512, every kernel listed: our conv's row kernels, then its tiles
#   stream        the graphed all-softmax step at 64 x 512 in line, with the live teacher on its own stream, and both
#                 again (decide timed all-GDN both ways), then compare_benches.py's table against the first
#   kl_loop       the KL's heads cast once to autocast's dtype (session 28; HD_KL_HEADS=float32 as before) and
#                 HD_KL_ROWS=triton_loop (session 27): the compiled-KL GPU tests (every KL-kernel candidate, the
#                 looping ones too), then the graphed all-softmax step with float32 heads, the default, the looping
#                 candidates, float32 heads and the default again (40 kernels listed), then compare_benches.py's table
#   merged        q/k/v and gate/up as one GEMM each (session 28, HD_MERGED_PROJECTIONS=on; +0.2-0.4%, off): the
#                 graphed all-softmax step with separate and merged projections, alternated twice (40 kernels listed)
#   merged_forward  q/k/v and gate/up as one GEMM in the forward only, each gradient GEMM alone with the input's
#                 gradient summed in place (session 29, HD_MERGED_PROJECTIONS=forward; -1.5% in session 30 with an
#                 out-of-place addmm that copied the sum, since fixed): the graphed all-softmax step
#                 with separate projections and with this, alternated twice (40 kernels listed), after its GPU test
#   inductor_tuning  Inductor's coordinate-descent tuning of its own kernels' launch configs (session 29,
#                 TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1): the graphed all-softmax step without and with it,
#                 alternated twice (40 kernels listed); the norm kernels run at a third to a half of the memory rate
#   inductor_tuning_gdn  the same on the graphed all-GDN step, once each way
#   sdpa          the softmax layers' attention in FlashAttention-2 (HD_SDPA=flash, session 28) against PyTorch's
#                 pick (cuDNN on an H100): the graphed all-softmax step, alternated twice (40 kernels listed)
#   qla_tests     FlashQLA's mixer test against fla's Triton kernels
#   qla_bench     all-GDN at Qwen2.5-3B widths with and without FlashQLA
#   decode_profile  graphed decoding at 8k x 16, both models compiled alike (their softmax attention really compiled
#                 since session 30), packed projections (the default), SmolLM2-135M and Llama-3.2-3B shapes:
#                 tokens/s, then a few steps of each model profiled (wall and kernel ms per step, kernel launches,
#                 the 25 longest kernels)
#   decode_packed  decode_profile with each token's q/k/v (and a mixer's gates) and gate/up as one GEMV each on
#                 weights packed once, both models (session 29, HD_PACKED_DECODE=on, the default since session 30),
#                 after the static-decode GPU tests with it
#   goal_rows     issue 6's stage-2 rows under the current defaults (session 31: MFU with attention reported): the
#                 graphed all-softmax step with activation memory budget 0.8 in its first BUDGET_LAYERS (default 7)
#                 of 30 layers, by default twice, at budget 0.8 everywhere (the 16.1 GB row), then all-GDN, 40
#                 kernels listed, then compare_benches.py's table against the first default row
#   decode_in_place  graphed decoding with GDN's state written in place and one copy of all conv caches: the
#                 static-decode GPU tests, then decode at 8k x 16 at SmolLM2-135M and Llama-3.2-3B shapes
#   ahead_tests   distill.teacher_ahead (session 33): the graphed-training GPU tests (jobs with the teacher one
#                 micro-batch ahead, eager and graphed, at each priority, against the job with the teacher in line),
#                 then the GPU tests its default touches: graphed scoring, replayed steps, the activation budget
#   default_tests  ahead_tests' second half alone
#   budget_layers  the graphed all-softmax step with activation memory budget 0.8 in its first BUDGET_LAYERS (default
#                 7) of 30 layers (session 34) and by default, alternated twice, 40 kernels listed, then
#                 compare_benches.py's table
#   teacher_ahead  the graphed all-softmax step at 64 x 512 by default (teacher stream), with the teacher one
#                 micro-batch ahead below the student's priority, at the same priority, then all three again (40
#                 kernels listed), then compare_benches.py's table against the first
#   kl_memory     the KL chunk's smaller working set (session 35: each gradient written over the student's logits,
#                 the teacher's logits made HD_KL_TEACHER_ROWS=1024 rows at a time): the compiled-KL GPU tests (its
#                 peak-memory case included), then the graphed all-softmax step with the teacher's logits in parts
#                 (the default) and whole (HD_KL_TEACHER_ROWS=0), alternated twice (40 kernels listed)
#   gdn_decode_tests  the static-decode GPU tests but GLA's, a GDN layer's decode step as one kernel (session 36,
#                 HD_GDN_DECODE=fused) against HF's dynamic loop and the compiled path included
#   gdn_decode    graphed decoding at 8k x 16 with HD_GDN_DECODE=compiled, then fused (profiled), at SmolLM2-135M and
#                 Llama-3.2-3B shapes (DECODE_SHAPES picks some)
#   fused_decode_tests  every static-decode GPU test, GLA's one-kernel decode step (HD_GLA_DECODE=fused) included
#   gla_decode    gdn_decode for a GLA hybrid: HD_GLA_DECODE=compiled, then fused (profiled)
# Usage: bash scripts/gpu/untimed_changes.sh PART (HD_REHEARSE=FILE records the commands without running them:
# scripts/gpu/rehearse.py)
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-bench-out}
parts="decide|conv_tests|conv_bench|stream|kept_states|kl_rows|kl_loop|merged|merged_forward|inductor_tuning|inductor_tuning_gdn|sdpa|stream_tests|qla_tests|qla_bench|goal_rows|decode_in_place|decode_profile|decode_packed|ahead_tests|default_tests|teacher_ahead|budget_layers|kl_memory|gdn_decode_tests|gdn_decode|fused_decode_tests|gla_decode"
part=${1:?usage: $0 $parts}
mkdir -p "$out/$part"
source "$root/scripts/gpu/bench_lib.sh"

tests() {  # tests LIMIT LOG PYTEST-ARGS...: one pytest run, verbose and unbuffered, into $out/$part/LOG
  local limit=$1 log=$2; shift 2
  rehearsing tests "$@" && return
  timeout "$limit" python -u -m pytest -v -p no:cacheprovider "$@" > "$out/$part/$log" 2>&1
  echo "$log: exit $? $(tail -1 "$out/$part/$log")"
}

script() {  # script LIMIT LOG SCRIPT ARGS...: one Python script, unbuffered, into $out/$part/LOG
  local limit=$1 log=$2; shift 2
  rehearsing script "$@" && { : > "$out/$part/$log"; return; }
  timeout "$limit" python -u "$@" > "$out/$part/$log" 2>&1
}

compare() {  # compare NAME...: compare_benches.py's table of those benches of this part that finished, the first
  # as the baseline (a bench stopped at its limit wrote no JSON and drops out)
  local name results=()
  for name in "$@"; do
    [[ -f $out/$part/$name.json || -n ${HD_REHEARSE:-} ]] && results+=("$out/$part/$name.json")
  done
  script 30 compare.txt "$root/scripts/compare_benches.py" "${results[@]}"
  cat "$out/$part/compare.txt"
}

# The graphed stage-2 step at 64 x 512 that decide, stream and kl_loop time, one student per part.
graphed_step=(--stages stage2 --stage2-steps project --warmup 3 --repeats 5 --kl-chunk-tokens 4096 --compile-blocks
              --compile-kl --bf16-weights --batch-size 64 --seq-len 512 --cuda-graph)
# The budgeted row of goal_rows and budget_layers: activation memory budget 0.8 in the first BUDGET_LAYERS (default 7)
# of 30 layers (session 34: 19.9 GB on an H100 with 7; session 35: 18.8 GiB with 7, 19.7 GiB with 2).
budget_layers=${BUDGET_LAYERS:-7}
budgeted=budget_08_layers$budget_layers
budget_08_layers=(--activation-memory-budget 0.8 --activation-memory-budget-layers "$budget_layers")

rows_within() {  # rows_within SECONDS, in a part's subshell: its benches write under $out/$part and share SECONDS;
  # the first compiles and autotunes on a fresh machine, the rest find it in the kernel caches, autotuning choices
  # included (the same kernel choices in every row)
  export TRITON_CACHE_AUTOTUNING=1
  out="$out/$part" deadline=$((SECONDS + $1))
}
first() { echo $(( deadline - SECONDS - $1 )); }  # first LATER: the first bench's time, LATER seconds kept back
share() { echo $(( (deadline - SECONDS) / $1 )); }  # share BENCHES: this bench's part of the time left

alternated() {  # alternated SECONDS LATER BASE CHANGED SWITCH=VALUE...: the graphed all-softmax step as BASE, as
  # CHANGED (with the switches set), then both again, within SECONDS (LATER: the seconds each later row is expected to
  # take), 40 kernels listed, then compare_benches.py's table against BASE
  local limit=$1 later=$2 base=$3 changed=$4 switches=("${@:5}")
  common=("${graphed_step[@]}" --students softmax --profile-top 40)
  (
    rows_within "$limit"
    bench "$base" "$(first $((3 * later)))"
    (export "${switches[@]}"; bench "$changed" "$(share 3)")
    bench "${base}_again" "$(share 2)"
    (export "${switches[@]}"; bench "${changed}_again" "$(share 1)")
  ) | grep -E "^(===|exit|stage2) "
  compare "$base" "$changed" "${base}_again" "${changed}_again"
}

llama3b_shape=(hidden_size=3072 intermediate_size=8192 num_hidden_layers=28 num_attention_heads=24
               num_key_value_heads=8 head_dim=128 vocab_size=128256)

decode_shape() {  # decode_shape LIMIT SHAPES NAME ARGS...: bench_inference.py at 8k x 16, 25% softmax, both models
  # compiled and graphed, at SHAPES (smollm2: SmolLM2-135M, llama3b: Llama-3.2-3B) within LIMIT, into
  # $out/$part/SHAPES_NAME.{log,json}
  local limit=$1 shapes=$2 name=$3 extra=(); shift 3
  [[ $shapes == llama3b ]] && extra=(--shape "${llama3b_shape[@]}")
  script "$limit" "${shapes}_$name.log" "$root/scripts/bench_inference.py" --contexts 8192 --batches 16 \
    --softmax-ratio 0.25 --compile --decode graph "$@" "${extra[@]}" --out "$out/$part/${shapes}_$name.json"
  echo "$shapes $name: exit $?"; grep -E "cuda_graph|model|^--" "$out/$part/${shapes}_$name.log"
}

decode_at_8k() {  # decode_at_8k LIMIT NAME ARGS...: decode_shape at SmolLM2-135M then Llama-3.2-3B shapes
  local limit=$1 name=$2 shapes; shift 2
  for shapes in smollm2 llama3b; do
    decode_shape "$limit" "$shapes" "$name" "$@"
  done
}

case $part in
  decide)
    common=("${graphed_step[@]}" --students gdn)
    (
      rows_within 530
      # the rows before all_three keep the defaults before session 26 but for their one change: teacher in line
      HD_GDN_KEEP_STATES=off HD_KL_ROWS=compiled bench default "$(first $((4 * 65)))" --no-teacher-stream \
        --no-teacher-ahead
      HD_GDN_KEEP_STATES=on HD_KL_ROWS=compiled bench kept_states "$(share 4)" --no-teacher-stream --no-teacher-ahead
      HD_GDN_KEEP_STATES=off HD_KL_ROWS=triton bench kl_triton "$(share 3)" --no-teacher-stream --no-teacher-ahead
      HD_GDN_KEEP_STATES=off HD_KL_ROWS=compiled bench teacher_stream "$(share 2)" --teacher-stream --no-teacher-ahead
      HD_GDN_KEEP_STATES=on HD_KL_ROWS=triton bench all_three "$(share 1)" --teacher-stream --no-teacher-ahead
    ) | grep -E "^(===|exit|stage2) "
    compare default kept_states kl_triton teacher_stream all_three ;;
  conv_tests)
    tests 330 conv_tests.log "$root/tests/gpu/test_mixer_kernels.py" \
      -k "short_conv or candidate or (our_conv and not gla)"
    script 150 short_conv_call.log "$root/scripts/gpu/bench_short_conv.py"
    head -5 "$out/$part/short_conv_call.log" ;;
  conv_bench)
    for kernels in rows tiles; do
      HD_CONV_KERNELS=$kernels OUT="$out/$part/$kernels" bash "$root/scripts/gpu/bench_step_profile.sh" profile_gdn \
        | grep -E "^(exit|stage2) "
    done ;;
  stream)  # decide timed all-GDN with the teacher stream; this is all-softmax, in line and on a stream, twice each
    common=("${graphed_step[@]}" --students softmax --no-teacher-ahead)
    (
      rows_within 450  # leaves a short lease time for a profile
      bench in_line "$(first $((3 * 60)))" --no-teacher-stream
      bench teacher_stream "$(share 3)" --teacher-stream
      bench in_line_again "$(share 2)" --no-teacher-stream
      bench teacher_stream_again "$(share 1)" --teacher-stream
    ) | grep -E "^(===|exit|stage2) "
    compare in_line teacher_stream in_line_again teacher_stream_again ;;
  stream_tests)
    tests 500 step_graph_tests.log "$root/tests/gpu/test_step_graph_cuda.py" -k "stream or head_dim" ;;
  qla_tests)
    tests 500 flash_qla_test.log "$root/tests/gpu/test_mixer_kernels.py" -k flash_qla ;;
  qla_bench)
    OUT="$out/$part" bash "$root/scripts/gpu/bench_weight_precision.sh" flash_qla | grep -E "^(exit|stage2) " ;;
  kept_states)
    tests 250 kept_states_tests.log "$root/tests/gpu/test_mixer_kernels.py" -k "kept_states"
    OUT="$out/$part" bash "$root/scripts/gpu/bench_step_profile.sh" keep_states | grep -E "^(exit|stage2) " ;;
  kl_rows)
    tests 200 compiled_kl_tests.log "$root/tests/gpu/test_compiled_kl_cuda.py"
    OUT="$out/$part" bash "$root/scripts/gpu/bench_step_profile.sh" kl_triton | grep -E "^(exit|stage2) " ;;
  kl_loop)  # session 28's heads cast once (HD_KL_HEADS) and session 27's looping programs (HD_KL_ROWS=triton_loop):
    # the compiled-KL GPU tests (every KL-kernel candidate, the one-GEMM accumulation), then the graphed all-softmax
    # step (the student nearest 40%; the KL is the same for every student), alternated
    tests 120 compiled_kl_tests.log "$root/tests/gpu/test_compiled_kl_cuda.py"
    common=("${graphed_step[@]}" --students softmax --profile-top 40)
    (
      rows_within 440
      HD_KL_HEADS=float32 bench float32_heads "$(first $((4 * 60)))"
      bench default "$(share 4)"
      HD_KL_ROWS=triton_loop bench looping "$(share 3)"
      HD_KL_HEADS=float32 bench float32_heads_again "$(share 2)"
      bench default_again "$(share 1)"
    ) | grep -E "^(===|exit|stage2) "
    compare float32_heads default looping float32_heads_again default_again ;;
  merged)  # session 28: q/k/v and gate/up as one GEMM each (HD_MERGED_PROJECTIONS=on), all-softmax, alternated
    alternated 330 50 separate merged HD_MERGED_PROJECTIONS=on ;;
  merged_forward)  # session 29: one GEMM forward, per-projection backward (HD_MERGED_PROJECTIONS=forward); its GPU
    # test (both merged choices against separate projections, compiled, bf16) first
    tests 120 merged_tests.log "$root/tests/gpu/test_merged_projections_cuda.py"
    alternated 330 50 separate forward_merged HD_MERGED_PROJECTIONS=forward ;;
  inductor_tuning|inductor_tuning_gdn)  # session 29: Inductor tunes each generated kernel's launch config by timing
    # it (its compile takes longer: that row gets all the time but what the later rows need); all-softmax alternated
    # twice, all-GDN (its norms took 16 ms of 144, session 27) once each way
    students=softmax rows=(default coordinate_descent default_again coordinate_descent_again)
    [[ $part == inductor_tuning_gdn ]] && students=gdn rows=(default coordinate_descent)
    common=("${graphed_step[@]}" --students "$students" --profile-top 40)
    (
      rows_within 540
      bench default "$(first 400)"
      (export TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1
       bench coordinate_descent "$(first $(( 50 * (${#rows[@]} - 2) )))")
      (( ${#rows[@]} > 2 )) || exit 0
      bench default_again "$(share 2)"
      TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 bench coordinate_descent_again "$(share 1)"
    ) | grep -E "^(===|exit|stage2) "
    compare "${rows[@]}" ;;
  goal_rows)  # session 31: where the issue's rows stand on this machine, one process per row
    common=("${graphed_step[@]}" --profile-top 40)
    rows=(softmax "$budgeted" softmax_again softmax_budget_08 gdn)
    (
      rows_within 540  # the budgeted row first: it compiles both variants of the layer (see budget_layers)
      bench "$budgeted" "$(first 380)" --students softmax "${budget_08_layers[@]}"
      bench softmax "$(share 4)" --students softmax
      bench softmax_again "$(share 3)" --students softmax
      bench softmax_budget_08 "$(share 2)" --students softmax --activation-memory-budget 0.8
      bench gdn "$(share 1)" --students gdn
    ) | grep -E "^(===|exit|stage2) "
    compare "${rows[@]}" ;;
  ahead_tests|default_tests)  # default_tests: the second half alone (session 33 ran the first)
    [[ $part == ahead_tests ]] && tests 250 ahead_tests.log "$root/tests/gpu/test_graphed_training_cuda.py"
    tests 250 default_tests.log "$root/tests/gpu/test_graphed_scoring_cuda.py" \
      "$root/tests/gpu/test_activation_budget_cuda.py" "$root/tests/gpu/test_step_graph_cuda.py" -k "not head_dim" ;;
  budget_layers)  # session 34: the graphed all-softmax step with activation memory budget 0.8 in its first 7 of 30
    # layers and by default, alternated twice, within BUDGET_LAYERS_S seconds (default 330). The budgeted row comes
    # first: it compiles both variants of the layer (session 34's first lease ran it second, and its 66 s share ran
    # out in the compile of the budgeted one)
    common=("${graphed_step[@]}" --students softmax --profile-top 40)
    rows=("$budgeted" softmax "${budgeted}_again" softmax_again)
    (
      rows_within "${BUDGET_LAYERS_S:-330}"
      bench "$budgeted" "$(first 120)" "${budget_08_layers[@]}"
      bench softmax "$(share 3)"
      bench "${budgeted}_again" "$(share 2)" "${budget_08_layers[@]}"
      bench softmax_again "$(share 1)"
    ) | grep -E "^(===|exit|stage2) "
    compare "${rows[@]}" ;;
  kl_memory)  # session 35: the KL chunk's working set, S + T + G (+ the last chunk's G) -> S + T / 4
    tests 150 kl_tests.log "$root/tests/gpu/test_compiled_kl_cuda.py"
    common=("${graphed_step[@]}" --students softmax --profile-top 40)
    rows=(kl_parts kl_whole kl_parts_again kl_whole_again)
    (
      rows_within "${KL_MEMORY_S:-390}"
      bench kl_parts "$(first 120)"
      HD_KL_TEACHER_ROWS=0 bench kl_whole "$(share 3)"
      bench kl_parts_again "$(share 2)"
      HD_KL_TEACHER_ROWS=0 bench kl_whole_again "$(share 1)"
    ) | grep -E "^(===|exit|stage2) "
    compare "${rows[@]}" ;;
  teacher_ahead)  # session 33: the teacher one micro-batch ahead, beside the student's forward and backward
    common=("${graphed_step[@]}" --students softmax --profile-top 40)
    # (the default since session 33; the first row is the default before it, the teacher stream)
    rows=(default ahead_low ahead_equal default_again ahead_low_again ahead_equal_again)
    (
      rows_within 560
      bench default "$(first $((5 * 50)))" --no-teacher-ahead
      bench ahead_low "$(share 5)" --teacher-ahead
      HD_TEACHER_AHEAD_PRIORITY=equal bench ahead_equal "$(share 4)" --teacher-ahead
      bench default_again "$(share 3)" --no-teacher-ahead
      bench ahead_low_again "$(share 2)" --teacher-ahead
      HD_TEACHER_AHEAD_PRIORITY=equal bench ahead_equal_again "$(share 1)" --teacher-ahead
    ) | grep -E "^(===|exit|stage2) "
    compare "${rows[@]}" ;;
  sdpa)  # session 28: FlashAttention-2 (HD_SDPA=flash) against PyTorch's pick (cuDNN on an H100), all-softmax
    alternated 300 45 auto flash HD_SDPA=flash ;;
  decode_in_place)
    tests 150 static_decode_tests.log "$root/tests/gpu/test_static_decode_cuda.py"
    decode_at_8k 200 shapes ;;
  gdn_decode_tests)  # session 36: the static-decode GPU tests, HD_GDN_DECODE=fused's included (GLA's left out)
    tests 280 static_decode_tests.log "$root/tests/gpu/test_static_decode_cuda.py" -k "not gla" ;;
  fused_decode_tests)  # session 36: every static-decode GPU test, GLA's one-kernel step (HD_GLA_DECODE=fused) too;
    # fla's GLA kernels autotune for minutes on a fresh machine
    tests 540 static_decode_tests.log "$root/tests/gpu/test_static_decode_cuda.py" ;;
  gla_decode)  # session 36: graphed decoding of a GLA hybrid with HD_GLA_DECODE=compiled, then fused (profiled), at
    # each of DECODE_SHAPES (default both)
    for shapes in ${DECODE_SHAPES:-smollm2 llama3b}; do
      HD_GLA_DECODE=compiled decode_shape 270 "$shapes" gla_compiled --mixer gla
      HD_GLA_DECODE=fused decode_shape 200 "$shapes" gla_fused --mixer gla --profile-top 25
    done ;;
  gdn_decode)  # session 36: a GDN layer's decode step as one kernel (HD_GDN_DECODE=fused) against the compiled
    # path, at each of DECODE_SHAPES (default both), the fused step profiled
    for shapes in ${DECODE_SHAPES:-smollm2 llama3b}; do
      HD_GDN_DECODE=compiled decode_shape 200 "$shapes" compiled
      HD_GDN_DECODE=fused decode_shape 200 "$shapes" fused --profile-top 25
    done ;;
  decode_profile|decode_packed)  # session 29: both models compiled alike (the teacher's attention too), each step
    # profiled; decode_packed with q/k/v (and a mixer's gates) and gate/up as one GEMV each (HD_PACKED_DECODE=on)
    if [[ $part == decode_packed ]]; then
      export HD_PACKED_DECODE=on
      tests 150 static_decode_tests.log "$root/tests/gpu/test_static_decode_cuda.py"
    fi
    decode_at_8k 250 profile --profile-top 25 ;;
  *) rehearsing unknown_part "$0" "$part"
     echo "usage: $0 $parts" >&2
     exit 2 ;;
esac
true
