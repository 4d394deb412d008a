"""The profile's kernel groups: real kernel names from H100/H200 stage-2 profiles land where a reader expects."""
import pytest

from hybrid_distill.distill.kernel_groups import GROUPS, OTHER, group_times, kernel_group

NAMES = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "gemm",
    "nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "gemm",
    "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>": "gemm",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>": "attention",
    "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>": "attention",
    "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "compiled (Inductor)",
    "triton_poi_fused__to_copy_silu_mul_1": "compiled (Inductor)",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>":
        "optimizer",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>":
        "casts and copies",
    "Memcpy DtoD (Device -> Device)": "casts and copies",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, LogSoftMaxForwardEpilogue>":
        "eager ATen",
    "void at::native::vectorized_elementwise_kernel<4, at::native::exp_kernel_cuda>": "eager ATen",
    "chunk_gated_delta_rule_fwd_kernel_h_blockdim64": OTHER,
    "chunk_scaled_dot_kkt_fwd_kernel": OTHER,
    "aten::mm": "gemm",
    "aten::_log_softmax": "eager ATen",
}


@pytest.mark.parametrize("name, group", NAMES.items())
def test_kernel_names_fall_in_their_group(name, group):
    assert kernel_group(name) == group


def test_group_times_sum_per_group_and_sort_largest_first():
    groups = group_times({"aten::mm": 3.0, "aten::addmm": 1.0, "triton_poi_fused_add_0": 2.0,
                          "chunk_fwd_kernel_o": 0.5})
    assert [(g["group"], g["ms"], g["kernels"]) for g in groups] == [
        ("gemm", 4.0, 2), ("compiled (Inductor)", 2.0, 1), (OTHER, 0.5, 1)]
    assert sum(g["share"] for g in groups) == pytest.approx(1.0)
    assert groups[0]["share"] == pytest.approx(4 / 6.5)
    assert {g["group"] for g in groups} <= set(GROUPS)
