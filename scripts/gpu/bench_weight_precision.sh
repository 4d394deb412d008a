#!/usr/bin/env bash
# On the lent GPU machine, after `source scripts/gpu/unpack.sh`: the stage-2 step with float32 weights under
# autocast against bf16 weights with float32 master copies (distill.bf16_weights), each row with its GEMM
# ceiling (the MFU if only the step's weight matmuls took time). Parts: `plain` (default; no compile, at 32k
# tokens per step and at the workflow's scoring shapes), `wide` (Qwen2.5-3B's widths, 8 layers), `compile`,
# `flash_qla` (all-GDN at those widths, bf16 weights, compiled KL, graphed then eager: fla's GDN kernels through its
# FlashQLA backend, FLA_FLASH_QLA=1, against its Triton ones, FLA_FLASH_QLA=0; FlashQLA needs head_dim 128).
# Each bench writes its JSON into $OUT and its log into $OUT/bench.log (bench_lib.sh).
# Usage: bash scripts/gpu/bench_weight_precision.sh [plain] [wide] [compile] [flash_qla]
set -uo pipefail
out=${OUT:-bench-out}
mkdir -p "$out"
common=(--stages stage2 --stage2-steps project --warmup 3 --repeats 5 --gemm-ceiling)
source "$(dirname "$0")/bench_lib.sh"
long=(--batch-size 16 --seq-len 2048 --kl-chunk-tokens 4096 --students softmax gdn)
workflow=(--batch-size 16 --seq-len 512 --kl-chunk-tokens 2048 --students gdn)
wide=(--batch-size 8 --seq-len 2048 --kl-chunk-tokens 2048 --students softmax gdn
      --shape vocab_size=151936 hidden_size=2048 intermediate_size=11008 num_hidden_layers=8
      num_attention_heads=16 num_key_value_heads=2 head_dim=128)
for part in "${@:-plain}"; do
  case $part in
    plain)
      bench b16x2048_fp32 150 "${long[@]}"
      bench b16x2048_bf16 110 "${long[@]}" --bf16-weights
      bench b16x512_fp32 50 "${workflow[@]}"
      bench b16x512_bf16 50 "${workflow[@]}" --bf16-weights ;;
    wide)
      bench wide_fp32 90 "${wide[@]}"
      bench wide_bf16 90 "${wide[@]}" --bf16-weights ;;
    compile)
      bench b16x2048_compile_fp32 200 "${long[@]}" --compile-blocks
      bench b16x2048_compile_bf16 200 "${long[@]}" --compile-blocks --bf16-weights ;;
    flash_qla)
      wide_gdn=("${wide[@]}" --students gdn --bf16-weights --compile-kl --profile-top 30)
      FLA_FLASH_QLA=0 bench wide_gdn_fla_triton_graph 200 "${wide_gdn[@]}" --cuda-graph
      FLA_FLASH_QLA=1 bench wide_gdn_flash_qla_graph 200 "${wide_gdn[@]}" --cuda-graph
      FLA_FLASH_QLA=1 bench wide_gdn_flash_qla_eager 150 "${wide_gdn[@]}" ;;
    *) rehearsing unknown_part "$0" "$part"; echo "usage: $0 [plain] [wide] [compile] [flash_qla]" >&2; exit 2 ;;
  esac
done
true
