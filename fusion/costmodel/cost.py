"""The roofline's record of one op or kernel, `Cost` (bytes, FLOPs, transcendentals, calls), and its time on
a hardware profile: ``Cost.time(hw)`` = max(bytes / bandwidth, FLOPs / peak, transcendentals / rate) + call
overheads. Units: bytes, FLOPs (one multiply-add = 2 FLOPs), transcendental evaluations, seconds.
How costs are counted from ops and graphs: fusion/costmodel/roofline.py (which re-exports `Cost`)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from fusion.costmodel.hardware import ATTENTION_KEY, BMM_KEY, HardwareProfile
from fusion.costmodel.ops_table import BASE_FN, gemm_rate


@dataclass
class Cost:
    bytes_read: float = 0.0
    bytes_written: float = 0.0
    flops: float = 0.0              # arithmetic FLOPs outside GEMMs (pointwise, reductions)
    gemm_flops: float = 0.0         # FLOPs done by matrix multiplies (and attention's two GEMMs)
    transcendentals: float = 0.0    # exp / tanh / erf / log / sigmoid / sin / cos / pow evaluations
    calls: int = 0                  # kernel launches / ATen calls (all of them)
    gemm_dtype: str = "float32"
    aten_calls: int = 0             # how many of `calls` are ATen calls (charged hw.aten_overhead)
    fresh_bytes: float = 0.0        # bytes written into outputs >= MMAP_THRESHOLD (page-faulted)
    # --- added later; keyword-only in practice (positional construction above stays valid) ---
    transcendental_mix: dict = field(default_factory=dict)  # "exp"/"erf"/"tanh" -> evaluations of it
    parallel_regions: float = 0.0   # OpenMP parallel regions entered (charged hw.parallel_overhead)
    view_calls: float = 0.0         # view ops called from Python (charged hw.view_overhead)
    gemm_calls: float = 0.0         # independent GEMM problems in gemm_flops (bmm batch, heads); 0 = calls
    generated: bool = False         # a generated (C++) kernel: hw.kernel_rates instead of ATen's rates

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written

    @property
    def total_flops(self) -> float:
        return self.flops + self.gemm_flops

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte moved."""
        return self.total_flops / self.bytes if self.bytes else float("inf")

    def __add__(self, other: "Cost") -> "Cost":
        out = Cost()
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "gemm_dtype":
                v = a if self.gemm_flops or not other.gemm_flops else b
            elif f.name == "transcendental_mix":
                v = {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {*a, *b}}
            elif f.name == "generated":
                v = a or b
            else:
                v = a + b
            setattr(out, f.name, v)
        return out

    def scaled(self, k: float) -> "Cost":
        def sc(name, v):
            if name in ("gemm_dtype", "generated"):
                return v
            if name == "transcendental_mix":
                return {f: n * k for f, n in v.items()}
            return v * k
        return Cost(*(sc(f.name, getattr(self, f.name)) for f in fields(self)))

    def bandwidth(self, hw: HardwareProfile) -> float:
        """hw.cache_bandwidth when all bytes moved fit in half the last-level cache, else hw.copy_bandwidth;
        for a generated kernel the streaming bandwidths its compiled code reaches (hw.kernel_rates)."""
        kr = self._kernel_rates(hw)
        dram = kr.get("dram_bandwidth") or hw.copy_bandwidth
        cache = kr.get("cache_bandwidth") or hw.cache_bandwidth
        if cache and self.bytes <= hw.llc_bytes / 2:
            return max(dram, cache)
        return dram

    def gemm_time(self, hw: HardwareProfile) -> float:
        """GEMM FLOPs at the rate this GEMM size reaches: hw.gemm_curve (measured FLOP/s vs FLOPs per
        GEMM, small sizes) interpolated log-log, the large-GEMM peak hw.gemm_flops beyond it."""
        if not self.gemm_flops:
            return 0.0
        key = self.gemm_dtype
        # bmm / attention rates are measured per call at head shapes (calibrate._attention_curves); a
        # profile without them prices each independent problem at the fp32 GEMM rate
        per_call = key in (BMM_KEY, ATTENTION_KEY)
        if per_call and key not in hw.gemm_flops:
            key, per_call = "float32", False
        peak = hw.gemm_flops.get(key) or hw.gemm_flops.get("float32") or 1e12
        curves = getattr(hw, "gemm_curve", None) or {}
        curve = curves.get(key)
        if curve is None and key == "float32_onednn" and curves.get("float32"):
            # oneDNN's small-size curve is not measured: MKL's fp32 curve scaled by the ratio of the peaks
            k = peak / (hw.gemm_flops.get("float32") or peak)
            curve = [[f, r * k] for f, r in curves["float32"]]
        n = (self.calls or 1) if per_call else (self.gemm_calls or self.calls or 1)
        return self.gemm_flops / gemm_rate(curve, self.gemm_flops / n, peak)

    def _kernel_rates(self, hw: HardwareProfile) -> dict:
        return (getattr(hw, "kernel_rates", None) or {}) if self.generated else {}

    def vector_time(self, hw: HardwareProfile) -> float:
        """Non-GEMM FLOPs: ATen pointwise throughput (hw.vector_flops), or for a generated kernel the
        register-level rate its compiled code reaches (hw.kernel_rates["flops"]) when measured."""
        return self.flops / (self._kernel_rates(hw).get("flops") or hw.vector_flops)

    def transcendental_time(self, hw: HardwareProfile) -> float:
        """Evaluations of a known function at its own measured rate, the rest at the harmonic-mean rate
        hw.transcendental_rate. ATen ops: hw.transcendental_rates (per op for gelu/silu/softmax, else per
        function, ops_table.BASE_FN); generated kernels: hw.kernel_rates (glibc's vector functions)."""
        if not self.transcendentals:
            return 0.0
        kr = self._kernel_rates(hw)
        rates = kr or getattr(hw, "transcendental_rates", None) or {}
        t, known = 0.0, 0.0
        for fn, n in self.transcendental_mix.items():
            r = (None if kr else rates.get(fn)) or rates.get(BASE_FN.get(fn, fn))
            if r:
                t += n / r
                known += n
        return t + max(self.transcendentals - known, 0.0) / hw.transcendental_rate

    def time(self, hw: HardwareProfile, overhead: float | None = None) -> float:
        """Predicted seconds on `hw`: the roofline max of the three limits, plus per-call overheads.

        max(bytes / bandwidth, GEMM time + FLOPs / vector_flops + transcendental time)
        (generated kernels: + (1 - overlap) * min of the two, hw.kernel_rates["overlap"] measured)
        + fresh_bytes / hw.page_fault_bandwidth (first touch of freshly mmapped outputs)
        + calls: `overhead` each when given; else ATen calls pay hw.aten_overhead, the others
          hw.kernel_overhead (+ hw.launch_overhead on GPUs)
        + parallel_regions * hw.parallel_overhead (OpenMP fork/join) + view_calls * hw.view_overhead."""
        t_mem = self.bytes / self.bandwidth(hw)
        t_cmp = self.gemm_time(hw) + self.vector_time(hw) + self.transcendental_time(hw)
        pf = getattr(hw, "page_fault_bandwidth", 0.0)
        t_fault = self.fresh_bytes / pf if pf else 0.0
        if overhead is not None:
            t_calls = self.calls * overhead
        else:
            launch = getattr(hw, "launch_overhead", 0.0)
            kernels = max(self.calls - self.aten_calls, 0)
            t_calls = kernels * (hw.kernel_overhead + launch) + self.aten_calls * hw.aten_overhead
        t_calls += (self.parallel_regions * getattr(hw, "parallel_overhead", 0.0)
                    + self.view_calls * getattr(hw, "view_overhead", 0.0))
        # generated kernels: only the measured fraction `overlap` of the smaller term hides under the larger
        ov = self._kernel_rates(hw).get("overlap", 1.0)
        return max(t_mem, t_cmp) + (1.0 - ov) * min(t_mem, t_cmp) + t_fault + t_calls

    def breakdown(self, hw: HardwareProfile) -> dict:
        """Each roofline term in seconds and which one bounds the kernel ("memory"/"compute")."""
        t_mem = self.bytes / hw.copy_bandwidth
        t_cmp = (self.gemm_flops / (hw.gemm_flops.get(self.gemm_dtype) or hw.gemm_flops["float32"])
                 + self.flops / hw.vector_flops + self.transcendentals / hw.transcendental_rate)
        return {"memory_s": t_mem, "compute_s": t_cmp, "total_s": self.time(hw),
                "bound": "memory" if t_mem >= t_cmp else "compute"}
