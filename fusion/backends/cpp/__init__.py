"""The C++ backend: kernel IRs -> one C++ translation unit -> one shared object -> a FusedKernel module each.

    modules = build(plan.irs, plan.specs, config)      # name -> runtime.FusedKernel

`render` prints the kernel IR and its plan (`KernelIR.plan`) as C++, `compiler` compiles a source once per
content hash into the kernel cache, `runtime` binds and calls the kernels.
"""
from __future__ import annotations

from fusion import progress
from fusion.backends.cpp import compiler
from fusion.backends.cpp import render, runtime
from fusion.config import Config
from fusion.lower import CodegenError
from fusion.lower.kernel_ir import KernelIR
from fusion.lower.specs import KernelSpec


def describe(ir: KernelIR) -> str:
    """The first few fused nodes of a kernel, for its docstring and reports."""
    return " -> ".join(m.name for m in ir.members[:6]) + (" ..." if len(ir.members) > 6 else "")


def build(irs: list[KernelIR], specs: list[KernelSpec], config: Config) -> dict[str, runtime.FusedKernel]:
    if not irs:
        return {}
    try:
        source = render.render_module(irs)
    except Exception as e:  # a bug in rendering: name the kernels
        raise CodegenError("render", [ir.name for ir in irs], repr(e)) from e
    progress.stage(f"lower: compile {len(irs)} kernels")
    try:
        cpp_path, so_path = compiler.build(source, config.cache_dir, config.cxx)
        lib = compiler.load(so_path)
    except Exception as e:
        raise CodegenError("compile", [ir.name for ir in irs], str(e)) from e
    modules: dict[str, runtime.FusedKernel] = {}
    for ir, spec in zip(irs, specs):
        try:
            fn = runtime.bind(lib, ir.name, len(ir.inputs) + len(ir.outputs))
        except AttributeError as e:
            raise CodegenError("load", [ir.name], str(e)) from e
        kind = "row_reduction" if ir.has_reduction else "pointwise"
        k = runtime.FusedKernel(ir.name, fn, spec, [m.name for m in ir.members], kind, cpp_path,
                                config.num_threads, describe(ir))
        k.so_path = so_path
        modules[ir.name] = k
    return modules
