"""Registers and spills of our short conv's and KL kernel's autotune candidates, compiled for sm_90 (H100/H200) on
any machine: Triton compiles to a cubin without a GPU, and its bundled cuobjdump reads the resource use. A candidate
that spills (STACK > 0) or needs many registers per element keeps fewer tokens in flight per SM (session 20,
docs/performance.md: registers did not predict the first backward pass's speed there).
Usage: python scripts/gpu/kernel_registers.py"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hybrid_distill.distill import kl_rows_triton as kl
from hybrid_distill.models.mixers import short_conv_triton as conv

SM90 = GPUTarget("cuda", 90, 32)
REGISTERS_PER_SM = 65536
MAX_PROGRAMS_PER_SM = 32  # sm_90's limit on resident blocks
POINTERS = {"x_ptr", "w_ptr", "b_ptr", "dy_ptr", "g_ptr", "y_ptr", "dx_ptr", "s_ptr", "t_ptr", "grad_ptr"}  # bf16
FLOAT32_POINTERS = {"dw_ptr", "db_ptr", "kl_ptr", "scale_ptr"}
UNALIGNED = {"log2_scale", "scale_stride"}  # a float, and a stride of 0 or 1


def signature(kernel, constants) -> dict:
    """Triton's signature of `kernel` for bf16 tensors, float32 partial sums and int32 sizes."""
    names = kernel.arg_names
    return {name: "constexpr" if name in constants else "*bf16" if name in POINTERS
            else "*fp32" if name in FLOAT32_POINTERS else "fp32" if name == "log2_scale" else "i32" for name in names}


def resource_use(kernel, constants: dict, warps: int) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread) of the kernel compiled for sm_90, specialised as a launch at
    SmolLM2 shapes is: every pointer and size divisible by 16 (64 x 512 tokens, 576 channels, rows of 1760)."""
    arguments = signature(kernel, constants)
    aligned = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(kernel.arg_names)
               if arguments[name] != "constexpr" and name not in UNALIGNED}
    compiled = triton.compile(ASTSource(kernel, arguments, constexprs=constants, attrs=aligned), target=SM90,
                              options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        report = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", report).groups()
    return int(registers), int(stack)


def resident_programs(registers: int, warps: int) -> int:
    """Programs of this many registers per thread that one SM holds at once."""
    return min(REGISTERS_PER_SM // (registers * 32 * warps), MAX_PROGRAMS_PER_SM)


def main() -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = [("forward", conv._conv_silu_forward, config, {"HAS_BIAS": False, "WIDTH": 4, "FAST": True})
            for config in conv._configs(conv._TILES)]
    first_pass = {"HAS_BIAS": False, "ROWS": conv.ROWS_PER_PROGRAM, "FAST": True}
    rows += [("grad_pre", conv._conv_silu_grad_pre, config, first_pass)
             for config in conv._configs(conv._FIRST_PASS_TILES)]
    rows += [("grad_input", conv._conv_silu_grad_input, config, {"WIDTH": 4}) for config in conv._configs(conv._TILES)]
    by_rows = {"HAS_BIAS": False, "ROWS": conv.ROWS_PER_PROGRAM, "FAST": True}
    rows += [("fwd_rows", conv._conv_silu_forward_rows, config, by_rows)
             for config in conv._row_configs(conv._FORWARD_ROW_TILES)]
    rows += [("bwd_rows", conv._conv_silu_backward_rows, config, by_rows)
             for config in conv._row_configs(conv._ROW_TILES)]
    print(f"{'kernel':10}  {'tile settings':24}  {'warps':>5}  {'regs':>4}  {'stack':>5}  {'elements/SM':>11}")
    for name, kernel, config, constants in rows:
        registers, stack = resource_use(kernel, {**constants, **config.kwargs}, config.num_warps)
        programs = resident_programs(registers, config.num_warps)
        rows = config.kwargs.get("BLOCK_T", 4 * config.kwargs.get("AHEAD", 1))  # row kernels: the rows read ahead
        in_flight = programs * rows * config.kwargs["BLOCK_D"]
        settings = ", ".join(f"{key}={value}" for key, value in config.kwargs.items())
        print(f"{name:10}  {settings:24}  {config.num_warps:5}  {registers:4}  {stack:5}  {in_flight:11}")
    for config in kl._configs(looping=True):  # elements/SM: each model's logits one iteration of the programs loads
        registers, stack = resource_use(kl._kl_rows_kernel, {"WRITE_GRAD": True, "FAST": True, **config.kwargs},
                                        config.num_warps)
        programs = resident_programs(registers, config.num_warps)
        if config.kwargs["PROGRAMS_PER_SM"]:  # programs looping over the rows: only that many per SM
            programs = min(programs, config.kwargs["PROGRAMS_PER_SM"])
        settings = ", ".join(f"{key}={value}" for key, value in config.kwargs.items())
        print(f"{'kl_rows':10}  {settings:24}  {config.num_warps:5}  {registers:4}  {stack:5}  "
              f"{programs * config.kwargs['BLOCK']:11}")


if __name__ == "__main__":
    main()
