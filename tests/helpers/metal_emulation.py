"""mx.fast.metal_kernel, emulated on this CPU: the kernel source is written
out as mlx writes it for Metal (its `write_signature` in
mlx/backend/common/metal_kernel.cpp, mlx 0.32), compiled with g++ against
metal_shim.h and run over emulated threadgroups. `metal_kernel` has
mx.fast.metal_kernel's arguments, so tests swap it in and the package's own
code launches it (kernels.py). What it cannot check: Metal's compiler, its
math library's rounding and the kernel's speed.
"""

import ctypes
import hashlib
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

SHIM = Path(__file__).parents[1] / "metal_shim.h"  # tests/metal_shim.h
BUILD = Path(tempfile.gettempdir()) / "mlx_diffusiongemma_metal_emulation"

# mlx's metal_attributes, in its order: those named in the body become parameters
ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup": ("uint", None),
    "dispatch_simdgroups_per_threadgroup": ("uint", None),
    "dispatch_threads_per_threadgroup": ("uint3", None),
    "grid_origin": ("uint3", None),
    "grid_size": ("uint3", "uint3{groups * threads, 1, 1}"),
    "quadgroup_index_in_threadgroup": ("uint", "t / 4"),
    "quadgroups_per_threadgroup": ("uint", "threads / 4"),
    "simdgroup_index_in_threadgroup": ("uint", "t / 32"),
    "simdgroups_per_threadgroup": ("uint", "threads / 32"),
    "thread_execution_width": ("uint", "32u"),
    "thread_index_in_quadgroup": ("uint", "t % 4"),
    "thread_index_in_simdgroup": ("uint", "t % 32"),
    "thread_index_in_threadgroup": ("uint", "t"),
    "thread_position_in_grid": ("uint3", "uint3{g * threads + t, 0, 0}"),
    "thread_position_in_threadgroup": ("uint3", "uint3{t, 0, 0}"),
    "threadgroup_position_in_grid": ("uint3", "uint3{g, 0, 0}"),
    "threadgroups_per_grid": ("uint3", "uint3{groups, 1, 1}"),
    "threads_per_grid": ("uint3", "uint3{groups * threads, 1, 1}"),
    "threads_per_simdgroup": ("uint", "32u"),
    "threads_per_threadgroup": ("uint3", "uint3{threads, 1, 1}"),
}
TYPES = {
    mx.float32: ("float", np.float32),
    mx.bfloat16: ("bfloat16_t", np.uint16),  # as bits
    mx.float16: ("float16_t", np.float16),
    mx.int32: ("int32_t", np.int32),
    mx.uint32: ("uint32_t", np.uint32),
}


def _to_numpy(a: mx.array) -> np.ndarray:
    a = a.view(mx.uint16) if a.dtype == mx.bfloat16 else a
    return np.ascontiguousarray(np.array(a))


def _to_mx(a: np.ndarray, dtype: mx.Dtype) -> mx.array:
    return mx.array(a).view(mx.bfloat16) if dtype == mx.bfloat16 else mx.array(a)


def _template_value(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return TYPES[value][0]


class metal_kernel:
    """mx.fast.metal_kernel's interface, run by emulation."""

    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True, **_):
        self.name, self.inputs, self.outputs = name, list(input_names), list(output_names)
        self.source, self.header = source, header
        self.attributes = [a for a in ATTRIBUTES if a in source]
        self.libraries = {}  # by what the generated source depends on

    def signature_source(self, inputs, output_dtypes, template) -> str:
        """The kernel's source as mlx writes it for Metal (header, template
        line, [[kernel]] signature, body)."""
        lines = [self.header]
        if template:
            kinds = ["int" if isinstance(v, int) and not isinstance(v, bool) else "bool" if isinstance(v, bool) else "typename" for _, v in template]
            lines.append("template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template)) + ">")
        params = []
        for i, (name, a) in enumerate(zip(self.inputs, inputs)):
            space = "constant" if a.size < 8 else "device"
            ref = "&" if a.ndim == 0 else "*"
            params.append(f"  const {space} {TYPES[a.dtype][0]}{ref} {name} [[buffer({i})]]")
            for suffix in ("_shape", "_strides", "_ndim"):
                if a.ndim > 0 and name + suffix in self.source:
                    raise NotImplementedError(f"{name}{suffix}: the emulation passes no shapes")
        for j, (name, dtype) in enumerate(zip(self.outputs, output_dtypes)):
            params.append(f"  device {TYPES[dtype][0]}* {name} [[buffer({len(inputs) + j})]]")
        params += [f"  {ATTRIBUTES[a][0]} {a} [[{a}]]" for a in self.attributes]
        lines.append(f"[[kernel]] void custom_kernel_{self.name}(\n" + ",\n".join(params) + ") {")
        lines += [self.source, "}"]
        return "\n".join(lines) + "\n"

    def _library(self, inputs, output_dtypes, template):
        kernel_source = self.signature_source(inputs, output_dtypes, template)
        targs = "<" + ", ".join(_template_value(v) for _, v in template) + ">" if template else ""
        args = [
            f"{'*' if a.ndim == 0 else ''}(const {TYPES[a.dtype][0]}*)in[{i}]" for i, a in enumerate(inputs)
        ] + [f"({TYPES[d][0]}*)out[{j}]" for j, d in enumerate(output_dtypes)]
        args += [ATTRIBUTES[a][1] for a in self.attributes]
        launcher = (
            'extern "C" void launch(void** in, void** out, unsigned groups, unsigned threads) {\n'
            "  shim_launch(groups, threads, [&](uint t, uint g) {\n"
            f"    custom_kernel_{self.name}{targs}({', '.join(args)});\n"
            "  });\n}\n"
        )
        text = f'#include "{SHIM}"\n' + kernel_source + launcher
        digest = hashlib.sha256((text + SHIM.read_text()).encode()).hexdigest()[:16]
        library = BUILD / f"{self.name}_{digest}.so"
        if not library.exists():
            BUILD.mkdir(parents=True, exist_ok=True)
            unit = BUILD / f"{self.name}_{digest}.cpp"
            unit.write_text(text)
            partial = library.with_suffix(".so.partial")
            result = subprocess.run(
                ["g++", "-std=c++20", "-O2", "-U_FORTIFY_SOURCE", "-shared", "-fPIC", "-Wno-attributes", str(unit), "-o", str(partial)],
                capture_output=True,
                text=True,
            )
            if result.returncode:
                raise RuntimeError(f"g++ rejected the kernel source:\n{result.stderr[-4000:]}")
            partial.rename(library)
        return ctypes.CDLL(str(library))

    def __call__(self, *, inputs, template=(), grid, threadgroup, output_shapes, output_dtypes, init_value=None, verbose=False, stream=None):
        threads = threadgroup[0]
        if grid[1:] != (1, 1) or threadgroup[1:] != (1, 1) or grid[0] % threads or threads % 32:
            raise NotImplementedError("the emulation runs 1-D grids of whole SIMD groups")
        signature = (
            tuple((a.dtype, a.size < 8, a.ndim == 0) for a in inputs),
            tuple(output_dtypes),
            tuple((n, str(v)) for n, v in template),
        )
        if signature not in self.libraries:
            self.libraries[signature] = self._library(inputs, output_dtypes, list(template))
        library = self.libraries[signature]
        host_in = [_to_numpy(a) for a in inputs]
        host_out = [np.zeros(shape, TYPES[d][1]) for shape, d in zip(output_shapes, output_dtypes)]
        pointers = lambda arrays: (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
        library.launch(pointers(host_in), pointers(host_out), ctypes.c_uint(grid[0] // threads), ctypes.c_uint(threads))
        return [_to_mx(a, d) for a, d in zip(host_out, output_dtypes)]
