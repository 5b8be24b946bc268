"""The fused kernel's CUDA source as mx.fast.cuda_kernel writes it (its
`build_kernel` in mlx/backend/cuda/custom_kernel.cpp, mlx 0.32), compiled here
with nvcc for sm_90 (or to PTX, to read what the compiler made of it). mlx's own default header (its device utils.cuh) is not
on this machine; the CUDA headers it includes stand in for it. What this
cannot check: running it (see benchmarks/fused_sampler.py on a GPU).
"""

import subprocess
from pathlib import Path

import mlx.core as mx

TYPES = {mx.float32: "float", mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.int32: "int32_t", mx.uint32: "uint32_t"}
DEFAULT_HEADER = "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n#include <cooperative_groups.h>\n"


def cuda_source(name, header, body, inputs, outputs, template) -> str:
    """inputs and outputs: (name, dtype) pairs; template: (name, value) pairs."""
    params = [f"    const {TYPES[d]}* {n}" for n, d in inputs] + [f"    {TYPES[d]}* {n}" for n, d in outputs]
    constants = []
    for n, v in template:
        if isinstance(v, bool):
            constants.append(f"  constexpr bool {n} = {'true' if v else 'false'};")
        elif isinstance(v, int):
            constants.append(f"  constexpr int {n} = {v};")
        else:
            constants.append(f"  using {n} = {TYPES[v]};")
    return (
        DEFAULT_HEADER
        + header
        + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        + f"__global__ void custom_kernel_{name}(\n"
        + ",\n".join(params)
        + ") {\n"
        + "\n".join(constants)
        + "\n\n"
        + body
        + "\n}\n\n} // namespace mlx::core::cu\n"
    )


def nvcc_compile(source: str, directory: Path, ptx: bool = False) -> subprocess.CompletedProcess:
    """An object file, or with `ptx` the PTX text (directory / "kernel.ptx")."""
    unit = directory / "kernel.cu"
    unit.write_text(source)
    kind, output = ("-ptx", "kernel.ptx") if ptx else ("-c", "kernel.o")
    command = ["nvcc", "-arch=sm_90", "-std=c++17", kind, str(unit), "-o", str(directory / output)]
    return subprocess.run(command, capture_output=True, text=True)
