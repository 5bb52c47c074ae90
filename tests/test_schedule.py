"""Grouping decisions of fusion.lower.schedule (no compilation)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fusion.dialect.ops  # noqa: F401
from fusion.lower import schedule as S
from .conftest import aten_graph


def groups_of(f, *args):
    gm = aten_graph(f, args)
    return gm, S.schedule(gm)


def names(g):
    return [m.name for m in g.members]


def test_softmax_chain_is_one_group_with_forms():
    _, gs = groups_of(lambda x: torch.exp(x - x.amax(-1, keepdim=True)) / torch.exp(x - x.amax(-1, keepdim=True)).sum(-1, keepdim=True),
                       torch.randn(4, 8))
    assert len(gs) == 1
    g = gs[0]
    assert [str(d) for d in g.D] == ["4", "8"]
    forms = {m.name: g.form[m] for m in g.members}
    assert forms["amax"] == "rowk" and forms["div"] == "full"
    assert [o.name for o in S.group_outputs(g)] == ["div"]


def test_attention_matmuls_stay_out():
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8), torch.randn(2, 4, 16, 8)
    _, gs = groups_of(lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * 0.125, -1) @ v, q, k, v)
    assert len(gs) == 1
    targets = {m.target for m in gs[0].members}
    assert torch.ops.aten._softmax.default in targets
    assert not any("bmm" in str(t) or "view" in str(t) for t in targets)


def test_layer_norm_decomposed_and_fused_op_groups():
    x, w, b = torch.randn(3, 5, 16), torch.randn(16), torch.randn(16)
    _, gs = groups_of(lambda x, w, b: F.layer_norm(x + 1, (16,), w, b), x, w, b)
    assert len(gs) == 1 and len(gs[0].members) == 3       # add, native_layer_norm, getitem
    _, gs = groups_of(lambda x, w: torch.ops.fusion.rms_norm(x, w, 1e-6) * 2, x, w)
    assert len(gs) == 1 and len(gs[0].members) == 2


def test_no_cycle_through_outside_node():
    # a -> cumsum (not fusable) -> c ; a -> c : c must not join a's group
    _, gs = groups_of(lambda x: torch.exp(x) + torch.cumsum(torch.exp(x), -1) * 2, torch.randn(4, 8))
    for g in gs:
        ms = g.member_set
        for m in g.members:
            for a in m.all_input_nodes:
                if a not in ms:
                    # no external input of a group may depend on a member of the same group
                    stack = [a]
                    seen = set()
                    while stack:
                        n = stack.pop()
                        assert n not in ms, (names(g), a.name)
                        if n in seen:
                            continue
                        seen.add(n)
                        stack.extend(n.all_input_nodes)


def test_non_last_dim_reduction_and_dtypes_not_fused():
    _, gs = groups_of(lambda x: x.sum(0, keepdim=True) * 2, torch.randn(64, 64))
    assert all("sum" not in names(g) for g in gs)
    _, gs = groups_of(lambda x: torch.exp(x) * 2, torch.randn(8, 8, dtype=torch.float64))
    assert gs == []
    _, gs = groups_of(lambda x: torch.exp(x) * 2, torch.randn(8, 8, dtype=torch.bfloat16))
    assert gs == []


def test_broadcast_operands_and_row_views():
    _, gs = groups_of(lambda x, b, m: torch.exp(x.amax(-1)).unsqueeze(-1) * x + b + m,
                      torch.randn(2, 3, 8), torch.randn(8), torch.randn(2, 1, 1))
    assert len(gs) == 1 and len(gs[0].members) == 6


def test_worth_a_kernel():
    _, gs = groups_of(lambda x: x + 1, torch.randn(4, 4))
    assert len(gs) == 1 and not S.worth_a_kernel(gs[0])       # one cheap op on a tiny tensor
    _, gs = groups_of(lambda x: torch.exp(x) + 1, torch.randn(4, 4))
    assert S.worth_a_kernel(gs[0])


def test_symbolic_shapes_compare_structurally():
    b = torch.export.Dim("b")
    gm = aten_graph(lambda x, m: torch.softmax(x + m, -1), (torch.randn(3, 16), torch.randn(16)),
                    dynamic_shapes=(({0: b}, None),))
    gs = S.schedule(gm)
    assert len(gs) == 1 and isinstance(gs[0].D[0], torch.SymInt) and len(gs[0].members) == 2


def test_worth_a_kernel_with_hardware_profile():
    from fusion.costmodel.hardware import HardwareProfile
    hw = HardwareProfile(name="t", copy_bandwidth=40e9, cache_bandwidth=100e9, llc_bytes=32 << 20,
                         gemm_flops={"float32": 1e12}, vector_flops=1e11, transcendental_rate=1e10,
                         kernel_overhead=5e-6, aten_overhead=4e-6, page_fault_bandwidth=8e9)
    _, gs = groups_of(lambda x: x + 1, torch.randn(4, 4))
    assert not S.worth_a_kernel(gs[0], hw)


def test_half_precision_groups_only_for_cuda():
    gm, gs = groups_of(lambda x: torch.softmax(x * 2, -1) + 1, torch.randn(4, 32, dtype=torch.bfloat16))
    assert gs == []                                           # the C++ path stays fp32-only
    assert S.float_in(("cpu", "cuda")) == (torch.float32, torch.float16, torch.bfloat16)
    kinds = [S.classify(n, ("cpu", "cuda")) for n in gm.graph.nodes if n.op == "call_function"]
    assert None not in kinds, kinds                           # fusable when CUDA is among the devices
    gs = S.schedule(gm, devices=("cpu", "cuda"))
    assert len(gs) == 1 and len(gs[0].members) >= 3
