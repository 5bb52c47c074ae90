"""Cost model: per-op formulas, fused-kernel boundary bytes, calibration storage, datasheet profiles."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fusion.costmodel import calibrate as cal
from fusion.costmodel import hardware
from fusion.costmodel import profile_store as store
from fusion.costmodel.hardware import HardwareProfile
from fusion.costmodel.datasheets import DATASHEET_PROFILES, get_profile
from fusion.costmodel.roofline import Cost, graph_cost, graph_time, kernel_cost, node_cost, op_cost

aten = torch.ops.aten

HW = HardwareProfile(name="test", copy_bandwidth=40e9, cache_bandwidth=200e9, llc_bytes=32 << 20,
                     gemm_flops={"float32": 200e9, "bfloat16": 800e9}, vector_flops=30e9,
                     transcendental_rate=2e9, kernel_overhead=3e-7, aten_overhead=2e-6,
                     page_fault_bandwidth=5e9)


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def trace(fn, *inputs, mode="fake"):
    return make_fx(fn, tracing_mode=mode)(*inputs)


def calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def softmax_hand(x):
    m = x.amax(-1, keepdim=True)
    e = (x - m).exp()
    return e / e.sum(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------- ops
def test_matmul_flops_exact():
    M, K, N = 64, 96, 48
    c = op_cost(aten.mm.default, [meta(M, K), meta(K, N)], meta(M, N))
    assert c.gemm_flops == 2 * M * N * K
    assert c.flops == 0
    assert c.bytes == 4 * (M * K + K * N + M * N)
    gm = trace(torch.mm, torch.randn(M, K), torch.randn(K, N))
    (mm,) = [n for n in calls(gm) if n.target == aten.mm.default]
    assert node_cost(mm).gemm_flops == 2 * M * N * K
    assert node_cost(mm).calls == 1


def test_gemm_family():
    B, M, K, N = 3, 16, 32, 8
    c = op_cost(aten.addmm.default, [meta(N), meta(M, K), meta(K, N)], meta(M, N))
    assert (c.gemm_flops, c.flops) == (2 * M * N * K, M * N)        # addmm adds the bias
    c = op_cost(aten.bmm.default, [meta(B, M, K), meta(B, K, N)], meta(B, M, N))
    assert c.gemm_flops == 2 * B * M * N * K
    c = op_cost(aten.linear.default, [meta(B, M, K), meta(N, K), meta(N)], meta(B, M, N))
    assert c.gemm_flops == 2 * B * M * N * K and c.flops == B * M * N
    c = op_cost(aten.mm.default, [meta(M, K, dtype=torch.bfloat16), meta(K, N, dtype=torch.bfloat16)],
                meta(M, N, dtype=torch.bfloat16))
    assert c.gemm_dtype == "bfloat16"
    c = op_cost(aten._int_mm.default, [meta(32, K, dtype=torch.int8), meta(K, N, dtype=torch.int8)],
                meta(32, N, dtype=torch.int32))
    assert c.gemm_dtype == "int8" and c.gemm_flops == 2 * 32 * N * K


def test_convolution_flops():
    x, w = meta(2, 3, 16, 16), meta(8, 3, 3, 3)
    out = meta(2, 8, 14, 14)
    c = op_cost(aten.convolution.default, [x, w], out,
                args=(x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1))
    assert c.gemm_flops == 2 * (2 * 8 * 14 * 14) * 3 * 3 * 3


def test_sdpa_flops_and_bytes():
    B, H, L, S, D = 2, 4, 32, 48, 16
    q, k, v, o = meta(B, H, L, D), meta(B, H, S, D), meta(B, H, S, D), meta(B, H, L, D)
    c = op_cost(aten.scaled_dot_product_attention.default, [q, k, v], o, args=(q, k, v))
    assert c.gemm_flops == 4 * B * H * S * L * D
    assert c.bytes == 4 * (q.numel() + k.numel() + v.numel() + o.numel())
    assert c.transcendentals == B * H * L * S


def test_fused_ops_one_read_one_write():
    x = meta(64, 128)
    for target, ins, tr in [
        (aten._softmax.default, [x], 64 * 128),
        (aten.gelu.default, [x], 64 * 128),
        (aten.silu.default, [x], 64 * 128),
    ]:
        c = op_cost(target, ins, meta(64, 128), args=(x, -1, False))
        assert c.bytes == 2 * 64 * 128 * 4, target
        assert c.transcendentals == tr, target
    import fusion.dialect.ops  # noqa: F401  (registers torch.ops.fusion.*)

    w, b = meta(128), meta(128)
    c = op_cost(torch.ops.fusion.layer_norm.default, [x, w, b], meta(64, 128))
    assert c.bytes == 4 * (2 * 64 * 128 + 2 * 128) and c.flops > 0
    c = op_cost(torch.ops.fusion.rms_norm.default, [x, w], meta(64, 128))
    assert c.bytes == 4 * (2 * 64 * 128 + 128) and c.transcendentals == 0


def test_views_are_free():
    x = torch.randn(4, 6, 8)
    gm = trace(lambda x: x.view(24, 8).t().unsqueeze(0).permute(0, 2, 1).expand(3, 24, 8)[0], x)
    for n in calls(gm):
        c = node_cost(n)
        assert (c.bytes, c.flops, c.calls) == (0, 0, 0), n.target


def test_broadcast_operand_read_once():
    s, mask = torch.randn(2, 3, 16, 16), torch.randn(1, 1, 16, 16)
    gm = trace(lambda s, m: s * 0.125 + m, s, mask)
    (add,) = [n for n in calls(gm) if n.target == aten.add.Tensor]
    c = node_cost(add)
    assert c.bytes_read == 4 * (s.numel() + mask.numel())
    assert c.bytes_written == 4 * s.numel()
    # an explicitly expanded (stride-0) operand also counts its own elements only
    c = op_cost(aten.add.Tensor, [meta(2, 3, 16, 16), meta(1, 1, 16, 16).expand(2, 3, 16, 16)], meta(2, 3, 16, 16))
    assert c.bytes_read == 4 * (s.numel() + mask.numel())


def test_pointwise_flop_table():
    x = meta(10, 10)
    assert op_cost(aten.add.Tensor, [x, x], x).flops == 100
    assert op_cost(aten.exp.default, [x], x).transcendentals == 100
    assert op_cost(aten.tanh.default, [x], x).transcendentals == 100
    assert op_cost(aten.pow.Tensor_Scalar, [x], x, args=(x, 2)).transcendentals == 0
    assert op_cost(aten.sum.dim_IntList, [x], meta(10, 1)).bytes == 4 * 110
    # unknown ops never raise
    c = op_cost(object(), [x], x)
    assert c.bytes == 800 and c.calls == 1


# ---------------------------------------------------------------------------------------------- kernels
def test_softmax_kernel_bytes():
    x = torch.randn(64, 256)
    gm = trace(softmax_hand, x)
    k = kernel_cost(calls(gm))
    assert k.bytes == 2 * x.numel() * 4
    assert k.calls == 1 and k.transcendentals == x.numel()
    gm2 = trace(lambda x: torch.softmax(x, -1), x)
    (sm,) = [n for n in calls(gm2) if n.target == aten._softmax.default]
    assert node_cost(sm).bytes == 2 * x.numel() * 4


def test_kernel_cost_of_chain_below_sum_of_nodes():
    x, w = torch.randn(512, 1024), torch.randn(1024)
    gm = trace(lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w, x, w)
    nodes = calls(gm)
    fused = kernel_cost(nodes)
    unfused = graph_cost(gm)
    assert fused.bytes == 4 * (2 * x.numel() + w.numel())
    assert fused.bytes < unfused.bytes
    assert fused.flops == pytest.approx(unfused.flops)
    assert fused.calls == 1 < unfused.calls
    assert fused.time(HW) < graph_time(gm, HW)


def test_kernel_boundary_outputs_and_shared_inputs():
    x = torch.randn(128, 128)

    def f(x):
        a = x.exp()
        b = a + x           # x read once by the kernel although used twice
        return b * 2, a     # a escapes (graph output): written once

    gm = trace(f, x)
    k = kernel_cost(calls(gm))
    assert k.bytes_read == 4 * x.numel()
    assert k.bytes_written == 2 * 4 * x.numel()
    # a partial kernel: only exp, whose output feeds nodes outside
    (exp,) = [n for n in calls(gm) if n.target == aten.exp.default]
    assert kernel_cost([exp]).bytes == 2 * 4 * x.numel()


def test_symbolic_shapes_use_hints():
    x = torch.randn(6, 40)
    gm = trace(softmax_hand, x, mode="symbolic")
    k = kernel_cost(calls(gm))
    assert k.bytes == 2 * x.numel() * 4
    for n in gm.graph.nodes:
        node_cost(n)        # never raises (sym_size nodes, SymInt args)


def test_page_fault_term():
    big = meta(4096, 4096)                 # 64 MB output: mmapped afresh each call
    c = op_cost(aten.exp.default, [big], big)
    assert c.fresh_bytes == 64 << 20
    assert c.time(HW) > Cost(c.bytes_read, c.bytes_written, c.flops, 0, c.transcendentals, 1).time(HW, HW.aten_overhead)


def test_cost_add_and_time():
    a = Cost(bytes_read=1e6, flops=1e6, calls=1)
    b = Cost(bytes_written=1e6, gemm_flops=1e9, calls=1, gemm_dtype="bfloat16")
    s = a + b
    assert s.bytes == 2e6 and s.calls == 2 and s.gemm_dtype == "bfloat16"
    assert s.time(HW) > 0 and s.time(HW, overhead=0.0) < s.time(HW, overhead=1.0)


def test_transformer_graph_has_no_unknown_ops():
    transformers = pytest.importorskip("transformers")
    from fusion.costmodel.roofline import _CONCAT, _CREATE, _EMPTY, _GATHER, _GEMM, _PW, _RED, _SCATTER, _SDPA, is_view_target, op_name

    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                                  vocab_size=100, attn_implementation="eager")
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()

    class W(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids):
            return self.m(input_ids=ids).last_hidden_state

    ep = torch.export.export(W(), (torch.randint(0, 100, (2, 16)),), strict=False).run_decompositions()
    known = set(_PW) | set(_RED) | _GEMM | _SDPA | _CREATE | _EMPTY | _GATHER | _SCATTER | _CONCAT | {
        "_softmax", "_log_softmax", "native_layer_norm", "pow", "native_dropout"}
    unknown = [str(n.target) for n in calls(ep.graph_module)
               if not is_view_target(n.target) and op_name(n.target)[1] not in known]
    assert not unknown
    c = graph_cost(ep.graph_module)
    assert c.gemm_flops > 0 and c.transcendentals > 0 and c.calls > 10


def test_transcendental_rate_per_function():
    import dataclasses

    hw = dataclasses.replace(HW, transcendental_rates={"exp": 4e9, "tanh": 1e9, "erf": 2e9})
    x = meta(1 << 20)
    e = op_cost(aten.exp.default, [x], x)
    t = op_cost(aten.tanh.default, [x], x)
    g = op_cost(aten.gelu.default, [x], x)
    assert e.transcendental_mix == {"exp": 1 << 20} and t.transcendental_mix == {"tanh": 1 << 20}
    assert g.transcendental_mix == {"gelu": 1 << 20}       # ATen's gelu: its own erf approximation
    assert g.transcendental_time(hw) == pytest.approx(t.transcendental_time(hw) / 2)   # no "gelu" rate: erf's
    hw_op = dataclasses.replace(hw, transcendental_rates={**hw.transcendental_rates, "gelu": 8e9})
    assert g.transcendental_time(hw_op) == pytest.approx((1 << 20) / 8e9)
    gt = op_cost(aten.gelu.default, [x], x, args=(x,), kwargs={"approximate": "tanh"})
    assert gt.transcendental_mix == {"tanh": 1 << 20}
    assert t.transcendental_time(hw) == pytest.approx(4 * e.transcendental_time(hw))
    s = op_cost(aten._softmax.default, [x], x, args=(x, -1, False))
    assert s.transcendental_mix == {"softmax": s.transcendentals}
    # a generated kernel calls the plain functions at the compiled code's rates
    gen = dataclasses.replace(hw, kernel_rates={"exp": 16e9, "erf": 8e9, "tanh": 8e9, "flops": 300e9})
    k = Cost(transcendentals=1 << 20, transcendental_mix={"exp": 1 << 20}, flops=3e6, calls=1, generated=True)
    assert k.transcendental_time(gen) == pytest.approx((1 << 20) / 16e9)
    assert k.vector_time(gen) == pytest.approx(3e6 / 300e9)
    both = e + t                                       # sums keep the mix per function
    assert both.transcendental_mix == {"exp": 1 << 20, "tanh": 1 << 20}
    assert both.scaled(0.5).transcendental_mix == {"exp": 1 << 19, "tanh": 1 << 19}


def test_parallel_regions_and_view_calls():
    import dataclasses

    hw = dataclasses.replace(HW, parallel_overhead=5e-6, view_overhead=1e-6)
    small, big = meta(1024), meta(1 << 20)
    assert op_cost(aten.add.Tensor, [small, small], small).parallel_regions == 0     # below ATen's grain
    c = op_cost(aten.add.Tensor, [big, big], big)
    assert c.parallel_regions == 1
    assert c.time(hw) == pytest.approx(c.time(HW) + 5e-6)
    assert Cost(view_calls=3).time(hw) == pytest.approx(3e-6)


def test_gemm_rate_curve():
    import dataclasses

    from fusion.costmodel.roofline import gemm_rate

    curve = [[2 * 64 ** 3, 20e9], [2 * 256 ** 3, 100e9], [2 * 1024 ** 3, 200e9]]
    assert gemm_rate(curve, 2 * 1024 ** 3 * 8, 200e9) == 200e9
    assert gemm_rate(curve, 2 * 256 ** 3, 200e9) == pytest.approx(100e9)
    mid = gemm_rate(curve, 2 * 128 ** 3, 200e9)
    assert 20e9 < mid < 100e9
    assert gemm_rate(curve, 2 * 32 ** 3, 200e9) == pytest.approx(20e9 / 8)      # below: constant time
    assert gemm_rate([], 1e6, 123.0) == 123.0
    hw = dataclasses.replace(HW, gemm_curve={"float32": curve})
    c = op_cost(aten.mm.default, [meta(64, 64), meta(64, 64)], meta(64, 64))
    assert c.gemm_time(hw) == pytest.approx(2 * 64 ** 3 / 20e9)
    b = op_cost(aten.bmm.default, [meta(16, 64, 64), meta(16, 64, 64)], meta(16, 64, 64))
    # a profile without a bmm rate: each of the 16 problems at the fp32 GEMM rate
    assert b.gemm_calls == 16 and b.gemm_time(hw) == pytest.approx(16 * c.gemm_time(hw))


def test_bmm_and_attention_use_their_measured_per_call_rates():
    """Calibrated profiles carry per-call rate curves for bmm and for the SDPA behind fusion.attention
    (head-shaped operands run far from the square-GEMM rate); without them the fp32 GEMM rate is used."""
    import dataclasses

    import fusion.dialect.ops  # noqa: F401  (torch.ops.fusion.attention)
    from fusion.extract.pricing import enode_cost
    from fusion.costmodel.hardware import ATTENTION_KEY, BMM_KEY

    hw = dataclasses.replace(HW, gemm_flops={**HW.gemm_flops, BMM_KEY: 50e9, ATTENTION_KEY: 400e9},
                             gemm_curve={BMM_KEY: [[1e6, 10e9], [1e9, 50e9]]})
    b = op_cost(aten.bmm.default, [meta(12, 512, 64), meta(12, 64, 512)], meta(12, 512, 512))
    assert b.gemm_dtype == BMM_KEY
    assert b.gemm_flops / 50e9 < b.gemm_time(hw) < b.gemm_flops / 10e9    # interpolated in the bmm curve
    assert b.gemm_time(hw) > b.gemm_flops / HW.gemm_flops["float32"]        # slower than a square GEMM here
    q = meta(1, 12, 512, 64)
    a = op_cost(torch.ops.fusion.attention.default, [q, q, q], q, args=(q, q, q, None, 0.125, False))
    assert a.gemm_dtype == ATTENTION_KEY and a.gemm_time(hw) == pytest.approx(a.gemm_flops / 400e9)
    # the e-graph's price of the same calls agrees with the FX-level one
    e = enode_cost("attention", [0.125, False], [list(q.shape)] * 3, list(q.shape), "float32")
    assert e.gemm_dtype == ATTENTION_KEY and e.time(hw) == pytest.approx(a.time(hw), rel=0.05)
    e = enode_cost("bmm", [], [[12, 512, 64], [12, 64, 512]], [12, 512, 512], "float32")
    assert e.gemm_dtype == BMM_KEY and e.gemm_time(hw) == pytest.approx(b.gemm_time(hw))
    # bf16 products keep their dtype's rate
    assert op_cost(aten.bmm.default, [meta(2, 8, 8, dtype=torch.bfloat16)] * 2,
                   meta(2, 8, 8, dtype=torch.bfloat16)).gemm_dtype == "bfloat16"


def test_fusion_attention_causal_flag():
    q = meta(2, 4, 64, 32)
    plain = op_cost(torch.ops.fusion.attention.default, [q, q, q], q, args=(q, q, q, None, 0.125, False))
    causal = op_cost(torch.ops.fusion.attention.default, [q, q, q], q, args=(q, q, q, None, 0.125, True))
    assert causal.gemm_flops == pytest.approx(plain.gemm_flops / 2)
    m = meta(1, 1, 64, 64)
    masked = op_cost(torch.ops.fusion.attention.default, [q, q, q, m], q, args=(q, q, q, m, 0.125, True))
    assert masked.gemm_flops == plain.gemm_flops                        # masked causal runs the full SDPA


def test_program_cost_counts_views_and_kernels():
    import dataclasses
    from types import SimpleNamespace

    from fusion.costmodel.program_cost import graph_program_time, kernel_info_cost, program_cost

    gm = trace(lambda x: softmax_hand(x.view(-1, 64)).t(), torch.randn(8, 64))
    costs = dict(program_cost(gm))
    assert sum(c.view_calls for c in costs.values()) == 2
    assert sum(c.aten_calls for c in costs.values()) == 5
    hw = dataclasses.replace(HW, view_overhead=1e-6, graph_call_overhead=2e-6)
    assert graph_program_time(gm, hw) == pytest.approx(sum(node_cost(n).time(hw) for n in calls(gm)) + 4e-6)
    k = SimpleNamespace(bytes_read=4 << 20, bytes_written=4 << 20, flops=5 << 20, transcendentals=1 << 20,
                        domain=[1024, 1024], nodes=["exp"])
    kc = kernel_info_cost(k, gm)
    assert kc.calls == 1 and kc.aten_calls == 0 and kc.parallel_regions == 1
    assert kc.transcendental_mix == {"exp": 1 << 20}


def test_old_profile_schema_is_remeasured(tmp_path, monkeypatch):
    import dataclasses

    store._MEMO.clear()
    path = tmp_path / "profiles" / f"{hardware.machine_key()}.json"
    store.save_profile(dataclasses.replace(HW, key=hardware.machine_key(), calibration_load=0.1), path)   # schema 0
    fresh = dataclasses.replace(HW, key=hardware.machine_key(), calibration_load=0.1, kernel_overhead=3e-6,
                                schema=cal.SCHEMA)
    monkeypatch.setattr(cal, "calibrate", lambda scale=1.0: fresh)
    monkeypatch.setattr(hardware, "load_average", lambda: 99.0)     # busy: keep the old numbers for now
    assert store.load_or_calibrate(str(tmp_path)).kernel_overhead == HW.kernel_overhead
    store._MEMO.clear()
    monkeypatch.setattr(hardware, "load_average", lambda: 0.0)      # quiet: re-measure
    assert store.load_or_calibrate(str(tmp_path)).kernel_overhead == 3e-6
    store._MEMO.clear()


# ---------------------------------------------------------------------------------------------- calibration
def test_calibration_stores_and_reloads(tmp_path, monkeypatch):
    store._MEMO.clear()
    hw = store.load_or_calibrate(str(tmp_path), scale=0.02)
    path = tmp_path / "profiles" / f"{hardware.machine_key()}.json"
    assert path.is_file()
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    for v in (hw.copy_bandwidth, hw.cache_bandwidth, hw.vector_flops, hw.transcendental_rate,
              hw.gemm_flops["float32"], hw.aten_overhead, hw.kernel_overhead,
              hw.gemm_flops["float32_bmm"], hw.gemm_flops["float32_attention"]):
        assert v > 0
    assert hw.measured and hw.key == hardware.machine_key()
    store._MEMO.clear()

    def boom(*a, **k):
        raise AssertionError("re-measured although a stored profile exists")

    monkeypatch.setattr(cal, "calibrate", boom)
    again = store.load_or_calibrate(str(tmp_path))
    assert again == hw
    assert not list(path.parent.glob(".*.tmp"))     # fusion.store.cache.atomic_path's temporary files


def test_calibration_env_dir_and_corrupt_file(tmp_path, monkeypatch):
    store._MEMO.clear()
    monkeypatch.setenv("FUSION_CACHE_DIR", str(tmp_path))
    path = store.profile_path(None)
    assert str(path).startswith(str(tmp_path))
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    hw = store.load_or_calibrate(None, scale=0.02)
    assert json.loads(path.read_text())["copy_bandwidth"] == hw.copy_bandwidth
    store._MEMO.clear()


def test_profile_table_prints():
    text = store.format_profile(HW)
    assert "copy bandwidth" in text and "GEMM float32" in text


def test_datasheet_profiles():
    assert set(DATASHEET_PROFILES) == {"A100-40GB", "H100-SXM", "H200"}
    for p in DATASHEET_PROFILES.values():
        assert not p.measured and "datasheet" in p.source
        assert 3e-6 <= p.launch_overhead <= 5e-6
        assert p.gemm_flops["bfloat16"] > p.gemm_flops["float32"]
    assert get_profile("h100").copy_bandwidth == 3.35e12
    assert get_profile("H200").copy_bandwidth > get_profile("h100").copy_bandwidth
    with pytest.raises(KeyError):
        get_profile("tpu")


def test_noisy_profile_is_kept_until_forced(tmp_path, monkeypatch):
    """A profile measured on a busy machine is not silently re-measured inside a later compile (that
    would hide a 256 MB, multi-second measurement there); force=True re-measures."""
    import dataclasses

    store._MEMO.clear()
    path = tmp_path / "profiles" / f"{hardware.machine_key()}.json"
    noisy = dataclasses.replace(HW, key=hardware.machine_key(), calibration_load=99.0, copy_bandwidth=1e9, schema=cal.SCHEMA)
    store.save_profile(noisy, path)
    fresh = dataclasses.replace(HW, key=hardware.machine_key(), calibration_load=0.1, copy_bandwidth=40e9, schema=cal.SCHEMA)
    calls = []
    monkeypatch.setattr(cal, "calibrate", lambda *a, **k: calls.append(1) or fresh)
    monkeypatch.setattr(hardware, "load_average", lambda: 0.0)
    hw = store.load_or_calibrate(str(tmp_path))
    assert hw.copy_bandwidth == 1e9 and calls == []
    store._MEMO.clear()
    hw = store.load_or_calibrate(str(tmp_path), force=True)
    assert hw.copy_bandwidth == 40e9 and calls == [1]
    store._MEMO.clear()


# ---------------------------------------------------------------------------------------------- bench
def test_bench_script_smoke(tmp_path, monkeypatch, capsys):
    """bench.run end to end on the smallest micro case, eager only, plus a failing 'fusion' variant:
    the failure lands in its column as 'error: ...' and the JSON is written."""
    from bench import run

    monkeypatch.setenv("FUSION_CACHE_DIR", str(tmp_path))
    store._MEMO.clear()
    monkeypatch.setattr(cal, "calibrate", lambda scale=1.0: HW)

    real = run.build_variant

    def fake(fn, inputs, v, threads):
        if v == "fusion":
            raise RuntimeError("backend not built yet")
        return real(fn, inputs, v, threads)

    monkeypatch.setattr(run, "build_variant", fake)
    out = tmp_path / "r.json"
    assert run.main(["--only", "attn_softmax", "--variants", "eager,fusion", "--repeat", "2", "--warmup", "0",
                     "--json", str(out), "--markdown"]) == 0
    doc = json.loads(out.read_text())
    (case,) = doc["cases"]
    assert case["results"]["eager"]["median_s"] > 0 and case["min_bytes"] > 0
    assert case["results"]["fusion"]["error"].startswith("RuntimeError: backend not built yet")
    assert "failed: RuntimeError" in capsys.readouterr().out
    store._MEMO.clear()
