#!/usr/bin/env bash
# On the lent GPU machine, after `source scripts/gpu/unpack.sh`: where the compiled stage-2 step's time goes
# (each row profiled: its top kernels and its device time by kind of kernel, beside its GEMM ceiling) and what
# the KL's compiled chunk maths (distill.compile_kl) and bf16 weights (distill.bf16_weights) change in it.
# Parts: `kl` (compiled blocks without and with compile_kl, all-softmax and all-GDN), `bf16` (both with bf16
# weights), `gdn` (all-GDN alone in its process with both, float32 and bf16 weights), `softmax` (all-softmax alone
# with both and bf16 weights), `recompute` (all-GDN with the paper configs' options and the recomputation), `graph`
# (all-GDN eager, then all-GDN and all-softmax replayed as one CUDA graph per step, bf16 weights), `short` and
# `short_graph` (both students at 64 x 512, the configs' sequence length, eager and graphed), `paper_graph`
# (all-GDN at 64 x 512 with the paper configs' options, recomputation included, graphed), `micro_softmax` and
# `micro_gdn` (64 x 512 graphed as 2 or 4 micro-batches whose gradients accumulate: one part's activations at a
# time, within the one graph), `kl_chunks` (all-softmax at 64 x 512 graphed with KL chunks of 2,048 and 1,024
# tokens: the KL's working set sits on top of every layer's stored activations at the peak), `budget_softmax` and
# `budget_gdn` (64 x 512 graphed with distill.activation_memory_budget below 1: the compiled code recomputes its
# cheapest activations in backward; BUDGETS="..." picks the budgets), `scoring_shape` (both students at 16 x 512,
# the SmolLM2 configs' scoring step of 8k tokens, graphed then eager), `profile_gdn` (all-GDN at 64 x 512 graphed,
# every kernel of the profiled step listed), `cached_graph` (all-GDN graphed, live and cached teacher, at 64 x 512
# and 16 x 512), `plain_scoring` (all-GDN at 16 x 512 with configs/smollm2-gpu.yaml's options: eager, no compile,
# float32 weights; live and cached teacher), `torch_conv` and `fla_l2norm` (all-GDN at 64 x 512 graphed, every kernel
# listed, with the short convs as compiled PyTorch code, HD_SHORT_CONV=torch, in place of the graphed steps' default
# fla conv; or with fla's kernel normalising q and k as well, HD_QK_L2NORM=fla), `conv_grads_split` (all-GDN at
# 64 x 512 graphed, every kernel listed, HD_CONV_GRADS_IN_PLACE=off: q, k and v's conv gradients concatenated, as
# before session 21), `conv_tiles` (the same with HD_CONV_KERNELS=tiles: our conv's tiled kernels and two-pass
# backward, as before session 22), `compiled_conv` (all-GDN at 64 x 512 compiled and not graphed, with fla's conv
# and with PyTorch's), `teacher_stream` (all-GDN, every kernel listed, and all-softmax at 64 x 512 graphed, with the
# live teacher's forward on its own CUDA stream: distill.teacher_stream), `keep_states` (all-GDN at 64 x 512 graphed,
# every kernel listed, HD_GDN_KEEP_STATES=on: fla's chunk states kept for backward), `kl_triton` (all-GDN, every kernel
# listed, and all-softmax at 64 x 512 graphed, with the KL's chunk maths in our two-pass kernel: HD_KL_ROWS=triton),
# `max_autotune` (all-GDN at 64 x 512 graphed, every kernel listed, TORCHINDUCTOR_MAX_AUTOTUNE=1: Inductor times its
# Triton GEMM templates against cuBLAS and may fuse the norms and casts around a GEMM into it; a long compile),
# `max_autotune_softmax` (all-softmax at 64 x 512 graphed, 40 kernels listed, default then max-autotune).
# 32k tokens per step unless said.
# Each bench writes its JSON into $OUT and its log into $OUT/bench.log (bench_lib.sh).
# Usage: bash scripts/gpu/bench_step_profile.sh [kl] [bf16] [gdn] [softmax] [recompute] [graph] [short] [short_graph]
#        [paper_graph] [micro_softmax] [micro_gdn] [kl_chunks] [budget_softmax] [budget_gdn] [scoring_shape]
#        [profile_gdn] [cached_graph] [plain_scoring] [torch_conv] [conv_grads_split] [conv_tiles] [fla_l2norm]
#        [compiled_conv] [teacher_stream] [keep_states] [kl_triton] [max_autotune] [max_autotune_softmax]
set -uo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
common=(--stages stage2 --stage2-steps project --warmup 3 --repeats 5 --gemm-ceiling --profile-top 10
        --batch-size 16 --seq-len 2048 --kl-chunk-tokens 4096 --compile-blocks)
graphed_gdn=(--students gdn --compile-kl --bf16-weights --batch-size 64 --seq-len 512 --cuda-graph --profile-top 120)
source "$(dirname "$0")/bench_lib.sh"
for part in "${@:-kl}"; do
  case $part in
    kl)
      bench compile_fp32 220 --students softmax gdn
      bench compile_kl_fp32 220 --students softmax gdn --compile-kl ;;
    bf16)
      bench compile_kl_bf16 220 --students softmax gdn --bf16-weights --compile-kl ;;
    gdn)
      bench gdn_kl_fp32 150 --students gdn --compile-kl
      bench gdn_kl_bf16 150 --students gdn --compile-kl --bf16-weights ;;
    softmax)
      bench softmax_kl_bf16 150 --students softmax --compile-kl --bf16-weights ;;
    recompute)
      bench gdn_recompute_bf16 150 --students gdn --compile-kl --bf16-weights --activation-checkpointing ;;
    graph)
      bench gdn_kl_bf16 200 --students gdn --compile-kl --bf16-weights
      bench gdn_graph_bf16 150 --students gdn --compile-kl --bf16-weights --cuda-graph
      bench softmax_graph_bf16 120 --students softmax --compile-kl --bf16-weights --cuda-graph ;;
    short|short_graph)
      graphed=(); [[ $part == short_graph ]] && graphed=(--cuda-graph)
      for student in ${STUDENTS:-softmax gdn}; do  # STUDENTS=softmax runs one of them
        bench "${part}_${student}_bf16" 150 --students $student --compile-kl --bf16-weights --batch-size 64 \
          --seq-len 512 "${graphed[@]}"
      done ;;
    paper_graph)
      bench paper_graph_gdn_bf16 200 --students gdn --compile-kl --bf16-weights --activation-checkpointing \
        --batch-size 64 --seq-len 512 --cuda-graph ;;
    micro_softmax)
      for parts in 2 4; do
        bench "micro${parts}_graph_softmax_bf16" 200 --students softmax --compile-kl --bf16-weights --batch-size 64 \
          --seq-len 512 --cuda-graph --micro-batches $parts
      done ;;
    micro_gdn)
      bench micro2_graph_gdn_bf16 300 --students gdn --compile-kl --bf16-weights --batch-size 64 --seq-len 512 \
        --cuda-graph --micro-batches 2 ;;
    kl_chunks)
      for chunk in 2048 1024; do
        bench "kl${chunk}_graph_softmax_bf16" 200 --students softmax --compile-kl --bf16-weights --batch-size 64 \
          --seq-len 512 --cuda-graph --kl-chunk-tokens $chunk
      done ;;
    budget_softmax|budget_gdn)
      student=${part#budget_}
      for budget in ${BUDGETS:-0.5 0.3}; do
        bench "budget${budget}_graph_${student}_bf16" 200 --students $student --compile-kl --bf16-weights \
          --batch-size 64 --seq-len 512 --cuda-graph --activation-memory-budget $budget
      done ;;
    scoring_shape)
      for student in gdn softmax; do
        for graphed in --cuda-graph ""; do
          bench "scoring_${student}${graphed:+_graph}_bf16" 150 --students $student --compile-kl --bf16-weights \
            --batch-size 16 --seq-len 512 $graphed
        done
      done ;;
    profile_gdn)
      bench profile_graph_gdn_bf16 200 "${graphed_gdn[@]}" ;;
    cached_graph)
      for shape in "64 512" "16 512"; do
        set -- $shape
        bench "cached_graph_gdn_${1}x${2}" 200 --students gdn --compile-kl --bf16-weights --batch-size $1 \
          --seq-len $2 --cuda-graph --stage2-steps project cached
      done ;;
    torch_conv)  # the short convs as compiled shifted sums (models/mixers/kernels.py's switches), as before session 16
      HD_SHORT_CONV=torch bench torch_conv_graph_gdn_bf16 200 "${graphed_gdn[@]}" ;;
    conv_grads_split)  # before session 21: our convs' gradients concatenated by the projection's split backward
      HD_CONV_GRADS_IN_PLACE=off bench conv_grads_split_graph_gdn_bf16 200 "${graphed_gdn[@]}" ;;
    conv_tiles)  # before session 22: our conv's tiled kernels, the backward in two passes
      HD_CONV_KERNELS=tiles bench conv_tiles_graph_gdn_bf16 200 "${graphed_gdn[@]}" ;;
    teacher_stream)  # the live teacher's forward on its own CUDA stream beside the student's (session 23)
      bench teacher_stream_graph_gdn_bf16 200 "${graphed_gdn[@]}" --teacher-stream --no-teacher-ahead
      bench teacher_stream_graph_softmax_bf16 200 --students softmax --compile-kl --bf16-weights --batch-size 64 \
        --seq-len 512 --cuda-graph --teacher-stream --no-teacher-ahead ;;
    keep_states)  # fla's GDN chunk states kept for backward, not recomputed (session 23)
      HD_GDN_KEEP_STATES=on bench keep_states_graph_gdn_bf16 200 "${graphed_gdn[@]}" ;;
    kl_triton)  # the KL's chunk maths in our kernel: two passes over the logits, where Inductor's made four (session 25)
      HD_KL_ROWS=triton bench kl_triton_graph_gdn_bf16 200 "${graphed_gdn[@]}"
      HD_KL_ROWS=triton bench kl_triton_graph_softmax_bf16 200 --students softmax --compile-kl --bf16-weights \
        --batch-size 64 --seq-len 512 --cuda-graph ;;
    max_autotune)  # Inductor's GEMM templates tried against cuBLAS, pointwise code fused into the GEMMs that win
      TORCHINDUCTOR_MAX_AUTOTUNE=1 bench max_autotune_graph_gdn_bf16 480 "${graphed_gdn[@]}" ;;
    max_autotune_softmax)  # the same for all-softmax, the student nearest 40%, after its default row
      graphed_softmax=(--students softmax --compile-kl --bf16-weights --batch-size 64 --seq-len 512 --cuda-graph
                       --profile-top 40)
      bench graph_softmax_bf16 150 "${graphed_softmax[@]}"
      TORCHINDUCTOR_MAX_AUTOTUNE=1 bench max_autotune_graph_softmax_bf16 400 "${graphed_softmax[@]}" ;;
    fla_l2norm)  # fla's GDN kernel normalises q and k itself, besides the default conv (ours)
      HD_QK_L2NORM=fla bench fla_l2norm_graph_gdn_bf16 200 "${graphed_gdn[@]}" ;;
    compiled_conv)  # not graphed: the host issues every launch
      for conv in fla torch; do
        HD_SHORT_CONV=$conv bench "compiled_${conv}_conv_gdn_bf16" 170 --students gdn --compile-kl --bf16-weights \
          --batch-size 64 --seq-len 512
      done ;;
    plain_scoring)  # configs/smollm2-gpu.yaml's scoring step: no compile, float32 weights, eager (the host's time)
      plain=(--stages stage2 --warmup 3 --repeats 5 --kl-chunk-tokens 2048 --batch-size 16 --seq-len 512)
      common_before=("${common[@]}"); common=("${plain[@]}")
      bench plain_scoring_gdn 200 --students gdn --stage2-steps project cached
      common=("${common_before[@]}") ;;
    *) rehearsing unknown_part "$0" "$part"
       echo "usage: $0 [kl] [bf16] [gdn] [softmax] [recompute] [graph] [short] [short_graph] [paper_graph]" \
         "[micro_softmax] [micro_gdn] [kl_chunks] [budget_softmax] [budget_gdn] [scoring_shape] [profile_gdn]" \
         "[cached_graph] [plain_scoring] [torch_conv] [conv_grads_split] [conv_tiles] [fla_l2norm]" \
         "[compiled_conv] [teacher_stream] [keep_states] [kl_triton] [max_autotune] [max_autotune_softmax]" >&2; exit 2 ;;
  esac
done
true
