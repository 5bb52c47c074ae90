"""Text for humans: `explain()` and `report()` of a compiled graph."""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.fx as fx

from fusion.analysis.coverage import format_coverage
from fusion.costmodel.hardware import achieved_bandwidth, mbu
from fusion.pipeline import CompiledGraph, CompileRecord, CompileLog, aten_calls


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _hw(config: Any) -> Any:
    from fusion.pipeline import hardware

    return hardware(config)


def explain_text(model_name: str, compiled: CompiledGraph, capture_seconds: float = 0.0) -> str:
    """explain() of a compiled graph: its log, its lowered program's code and ATen calls, priced with the
    hardware profile of its config."""
    gm = compiled.gm
    return explain_log(model_name, compiled.log, compiled.config, gm.code, aten_calls(gm), capture_seconds)


def explain_recorded(model_name: str, record: CompileRecord) -> str:
    """explain_text of a remembered compile (fusion.pipeline.RECENT): from the graph itself while the user's
    program holds it, else from what the record took at compile time (the same text for an unchanged graph)."""
    live = record.compiled
    if live is not None:
        return explain_text(model_name, live)
    return explain_log(model_name, record.log, record.config, record.code, record.aten_calls)


def explain_log(model_name: str, log: CompileLog, config: Any, code: str, n_aten: int,
                capture_seconds: float = 0.0) -> str:
    """The explain() text from a compile log, the program's code and its number of ATen calls."""
    n_kernels = len(log.kernels)
    lines = [
        f"fusion: {model_name} ({log.label} graph): {log.num_nodes} captured nodes -> "
        f"{n_kernels} fused kernels + {n_aten} ATen calls",
        "",
        "passes:",
    ]
    if capture_seconds:
        lines.append(f"  {'capture':<10} {fmt_time(capture_seconds):>10}  ok")
    for p in log.passes:
        lines.append(f"  {p.name:<10} {fmt_time(p.seconds):>10}  {'ok' if p.ok else 'FAILED: ' + p.detail}")
    stats = log.rewrite_stats
    if stats:
        shown = {k: v for k, v in stats.items() if not isinstance(v, (dict, list))}
        lines.append("  e-graph: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    lines += ["", "rules fired:"]
    if log.fired:
        for rule, nodes in sorted(log.fired.items()):
            shown = ", ".join(nodes[:8]) + (f", ... ({len(nodes)} nodes)" if len(nodes) > 8 else "")
            lines.append(f"  {rule:<24} replaced {len(nodes):>4} nodes: {shown}")
    else:
        lines.append("  (none)")
    covered = format_coverage(getattr(log, "coverage", None) or [])
    if covered or any(p.name == "rewrite" and p.ok for p in log.passes):   # no section where nothing looked
        lines += ["", "fusion coverage (softmax / norm / activation / attention sites in the captured graph):",
                  covered or "  (none)"]
    sites = (stats or {}).get("sites") or []
    if sites:
        lines += ["", "choices per site (predicted time of the whole program with each alternative; "
                  "extraction takes the cheapest):"]
        for site in sites:
            chosen = site["chosen"]
            lines.append(f"  {site['rule']:<12} at {site['node']:<16} chosen  {chosen['form']:<30} "
                         f"{fmt_time(chosen['cost_s']):>10}")
            for alt in site["alternatives"]:
                delta = alt["cost_s"] - chosen["cost_s"]
                label = "as written: " + alt["form"] if alt["as_written"] else alt["form"]
                lines.append(f"  {'':<12}    {'':<16} instead {label:<30} {fmt_time(alt['cost_s']):>10}"
                             f"  ({'+' if delta >= 0 else '-'}{fmt_time(abs(delta)).strip()})")
            if not site["alternatives"]:
                lines.append(f"  {'':<12}    {'':<16} (no other form of this value in the e-graph)")
    merges = (stats or {}).get("shared_matmul") or []
    if merges:
        lines += ["", "shared-input matmuls (fusion/passes/merge.py: one GEMM + split where predicted faster):"]
        for d in merges:
            what = (f"[{d['m']} x {d['k']}] x [{d['k']} x {'+'.join(str(n) for n in d['n'])}]")
            verdict = "merged" if d["merged"] else "kept  "
            note = f"  ({d['note']})" if d.get("note") else ""
            lines.append(f"  {verdict} {', '.join(d['products'])}: {what}: one GEMM ({d['library']}) "
                         f"{fmt_time(d['merged_s'])} vs separate {fmt_time(d['separate_s'])}{note}")
        moved = (stats or {}).get("stacked_weights") or {}
        not_moved = {k: v for k, v in moved.items() if v not in ("stacked", "adjacent")}
        for names, why in not_moved.items():
            lines.append(f"  weights {names} not made adjacent ({why}): separate GEMMs run there")
    if log.approx is not None:
        lines += ["", "approximate rewrites (opt-in; relu_attention is exact only for models trained with it):",
                  "  " + log.approx.summary().replace("\n", "\n  ")]
    lines += ["", "kernels:"]
    hw = _hw(config) if log.kernels else None
    for k in log.kernels:
        pred = _predict(k, hw)
        lines.append(
            f"  {k.name:<28} fuses {', '.join(k.nodes)}\n"
            f"  {'':<28} reads {fmt_bytes(k.bytes_read)}, writes {fmt_bytes(k.bytes_written)}, "
            f"{k.flops:.3g} FLOPs, {k.transcendentals:.3g} transcendentals, predicted {fmt_time(pred)}\n"
            f"  {'':<28} source: {k.source_path}"
        )
    if not log.kernels:
        lines.append("  (none: the program runs on ATen)")
    tuned = getattr(log, "gemm_tuning", {}) or {}
    if getattr(log, "onednn_gemms", 0) or tuned:
        how = (f"each product's library measured at its shape ({tuned.get('measured', 0)} timed now, "
               f"{tuned.get('seconds', 0.0):.2f} s; the others from the tuning cache)" if tuned else
               "by the profile's GEMM rates (Config(tune=False))")
        lines += ["", f"GEMM library: {log.onednn_gemms} fp32 matrix products run on oneDNN (mkldnn._linear_pointwise), "
                      f"the rest on ATen's MKL mm: {how} (fusion/passes/gemm.py)"]
    forms = getattr(log, "attention_forms", {}) or {}
    if forms:
        lines += ["", f"attention: {forms.get('sdpa', 0)} calls on SDPA, {forms.get('decomposed', 0)} as two batched "
                      "GEMMs + softmax, each the form measured faster at its shape (SDPA without a measurement) "
                      "(fusion/passes/attention.py)"]
    lay = getattr(log, "layout", {}) or {}
    if lay:
        ms = lay.get("measured_ms")
        why = (f"its {lay.get('ops', 0)} convolutions and pools measured {ms['nchw']:.2f} ms NCHW, "
               f"{ms['channels_last']:.2f} ms channels-last at their shapes" if ms else "no measurement")
        extra = (f"; {lay.get('pointwise_nhwc', 0)} pointwise ops on NHWC views, conv weights made channels-last "
                 "in place" if lay.get("layout") == "channels_last" else "")
        lines += ["", f"layout: {lay.get('layout')} ({why}{extra}) (fusion/passes/layout.py)"]
    lines += ["", "fallbacks:"]
    lines += [f"  {f}" for f in log.fallbacks] or ["  (none)"]
    lines += ["", "program:", code.strip("\n")]
    return "\n".join(lines) + "\n"


def _predict(k: Any, hw: Any) -> float | None:
    if hw is None:
        return None
    from fusion.costmodel.roofline import Cost

    return Cost(k.bytes_read, k.bytes_written, k.flops, 0, k.transcendentals, 1).time(hw)


def measure_modules(gm: fx.GraphModule, args: Sequence[Any], repeat: int = 5) -> dict[str, float]:
    """Median seconds of each call_module node (fused kernel) when the program runs on `args`."""
    times: dict[str, float] = {}

    class Timer(fx.Interpreter):
        def call_module(self, target: Any, a: Any, kw: Any) -> Any:
            out = super().call_module(target, a, kw)
            samples = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                super().call_module(target, a, kw)
                samples.append(time.perf_counter() - t0)
            times[target] = sorted(samples)[len(samples) // 2]
            return out

    with torch.no_grad():
        Timer(gm).run(*args)
    return times


def kernel_table(compiled: CompiledGraph, inputs: Sequence[Any] | None) -> list[dict]:
    log = compiled.log
    hw = _hw(compiled.config)
    measured = measure_modules(compiled.gm, inputs) if inputs is not None and log.kernels else {}
    rows = []
    for k in log.kernels:
        nbytes = k.bytes_read + k.bytes_written
        m = measured.get(k.name)
        rows.append({
            "kernel": k.name,
            "nodes": len(k.nodes),
            "flops": k.flops,
            "bytes": nbytes,
            "intensity": k.flops / nbytes if nbytes else 0.0,
            "predicted_s": _predict(k, hw),
            "measured_s": m,
            "GB/s": achieved_bandwidth(nbytes, m) / 1e9 if m else None,
            "MBU": mbu(nbytes, m, hw.copy_bandwidth) if hw is not None else None,   # the one bench/run.py uses
        })
    return rows


def _opt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no fused kernels)"
    head = f"{'kernel':<28} {'nodes':>5} {'FLOPs':>9} {'bytes':>9} {'FLOP/B':>7} {'predicted':>10} {'measured':>10} {'GB/s':>6} {'MBU':>5}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r['kernel']:<28} {r['nodes']:>5} {r['flops']:>9.3g} {fmt_bytes(r['bytes']):>9} {r['intensity']:>7.2f} "
            f"{fmt_time(r['predicted_s']):>10} {fmt_time(r['measured_s']):>10} "
            f"{_opt(r['GB/s'], '.1f'):>6} {_opt(r['MBU'], '.2f'):>5}"
        )
    return "\n".join(out)
