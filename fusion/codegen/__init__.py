"""Code generators: `prims` (kernel IR from scheduled groups) and `cpp` (C++ rendering)."""
from fusion.codegen.cpp import render, render_module
from fusion.codegen.prims import KernelIR, build

__all__ = ["KernelIR", "build", "render", "render_module"]
