"""fusion.analyze: FLOPs and bytes against hand counts, KV cache, memory, before/after, MBU vs the bench."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion
from fusion.errors import FusionInputError
from fusion.workloads.blocks import BertBlock, LlamaBlock, bert_block_inputs
from tests.cli_models import TinyDecoder

B, S, D, H, FFN = 4, 128, 768, 12, 3072   # the built-in BERT workload's shapes
DH = D // H
FP32 = 4                                   # bytes per element


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return fusion.analyze(BertBlock().eval(), bert_block_inputs(B, S, D), measure=False)


def test_bert_flops_match_the_analytic_count(bert):
    tok = B * S
    matmuls = {                               # 2*M*N*K per matmul
        "qkv projection": 2 * tok * D * 3 * D,
        "scores q @ k^T": 2 * B * H * S * S * DH,
        "probs @ v": 2 * B * H * S * S * DH,
        "output projection": 2 * tok * D * D,
        "mlp up": 2 * tok * D * FFN,
        "mlp down": 2 * tok * FFN * D,
    }
    gemm = sum(matmuls.values())
    assert bert.totals["gemm_flops"] == pytest.approx(gemm, rel=1e-9)
    # the rest (bias adds, scale, mask, softmax, layer norms, GELU) is well under 2 % of the total
    assert abs(bert.totals["flops"] - gemm) / bert.totals["flops"] < 0.02
    # and counted elementwise: 1 FLOP per output element of each arithmetic op, reductions 1 per input
    # element, exp/erf are transcendentals (not FLOPs)
    act, hid, sc = tok * D, tok * FFN, B * H * S * S
    biases = tok * 3 * D + tok * D + tok * FFN + tok * D
    softmax = sc * (1 + 1 + 1 + 1 + 1 + 1)          # / sqrt(dh), + mask, amax, - max, sum, / sum
    layer_norm = 2 * (act * 9 + 2 * tok)            # + residual, mean, x-mu (x2), pow, mean, /, *w, +b; eps, sqrt
    gelu = hid * 4                                  # / sqrt(2), 1 + erf, 0.5 * h, * (...)
    assert bert.totals["flops"] == pytest.approx(gemm + biases + softmax + layer_norm + gelu, rel=1e-9)
    assert bert.totals["transcendentals"] == 2 * sc + hid   # exp written twice in the block, erf


def test_bert_bytes_match_a_hand_count(bert):
    """Bytes as the analysis defines them: each ATen call reads every distinct element of its tensor
    operands once (weights included, broadcast operands once) and writes its outputs once; views are free.
    The count follows BertBlock.forward line by line, with the layout copies the matmuls need."""
    tok = B * S
    act, hid, sc = tok * D * FP32, tok * FFN * FP32, B * H * S * S * FP32
    row, srow, mask = tok * FP32, B * H * S * FP32, B * S * FP32   # per-token / per-score-row stats, [B,1,1,S] mask

    def linear(din, dout):                   # x read, W and b read once, y written
        return tok * din * FP32 + din * dout * FP32 + dout * FP32, tok * dout * FP32

    def residual_layer_norm():               # x + y, then the hand-written layer norm (x - mu written twice)
        return [(2 * act, act), (act, row), (act + row, act), (act + row, act), (act, act), (act, row),
                (row, row), (row, row), (act + row, act), (act + D * FP32, act), (act + D * FP32, act)]

    ops = [
        linear(D, 3 * D),                    # qkv
        (act, act), (act, act),              # q and k made contiguous for q @ k^T
        (2 * act, sc),                       # scores
        (sc, sc), (sc + mask, sc),           # / sqrt(dh), + mask
        (sc, srow), (sc + srow, sc),         # amax, s - max
        (sc, sc), (sc, sc),                  # exp (twice: the expression appears twice)
        (sc, srow), (sc + srow, sc),         # sum, exp / sum
        (act, act), (sc + act, act),         # v made contiguous, probs @ v
        (act, act),                          # transpose(1, 2).reshape copy
        linear(D, D),                        # output projection
        *residual_layer_norm(),
        linear(D, FFN),                      # mlp up
        (hid, hid), (hid, hid), (hid, hid), (hid, hid), (2 * hid, hid),   # GELU: /sqrt2, erf, 1+, 0.5*, *
        linear(FFN, D),                      # mlp down
        *residual_layer_norm(),
    ]
    hand = sum(r + w for r, w in ops)
    assert abs(bert.totals["bytes"] - hand) / hand < 0.05
    # weights are read once each: their bytes are inside the count exactly once
    assert bert.weight_bytes == sum(p.numel() * FP32 for p in BertBlock().parameters())


def test_bert_table_fits_100_columns(bert):
    text = bert.table(top=10)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "KV cache" in text and "total:" in text


# ---------------------------------------------------------------------------------------------- KV cache
def test_kv_cache_from_the_graph_llama_block():
    torch.manual_seed(0)
    a = fusion.analyze(LlamaBlock().eval(), (torch.randn(2, 64, 512),), measure=False)
    assert len(a.kv_sites) == 1 and a.kv_source.startswith("1 attention site")
    assert (a.batch, a.seq) == (2, 64)
    assert a.kv_bytes_per_token == 2 * 512 * FP32                   # K and V, all heads x head_dim, fp32
    assert a.kv_cache_bytes(3, 1000) == 3 * 1000 * 2 * 512 * FP32


class SDPABlock(nn.Module):
    def __init__(self, d=64, heads=4):
        super().__init__()
        self.h, self.qkv = heads, nn.Linear(d, 3 * d)

    def forward(self, x):
        Bx, Sx, Dx = x.shape
        q, k, v = self.qkv(x).view(Bx, Sx, 3, self.h, Dx // self.h).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(Bx, Sx, Dx)


@pytest.mark.parametrize("model, per_token", [
    (TinyDecoder(), 2 * 2 * 16 * FP32),      # grouped-query: 2 key-value heads of 16, not the 4 query heads
    (SDPABlock(), 2 * 64 * FP32),            # F.scaled_dot_product_attention (decomposed: K is scaled)
], ids=["gqa_repeat_kv", "sdpa"])
def test_kv_cache_counts_stored_heads(model, per_token):
    a = fusion.analyze(model.eval(), (torch.randn(2, 32, 64),), measure=False)
    assert len(a.kv_sites) == 1
    assert a.kv_bytes_per_token == per_token
    assert a.memory(2, 32)["kv_cache"] == 2 * 32 * per_token


def test_kv_cache_from_hf_config_without_attention_in_the_graph():
    class Projection(nn.Module):             # no attention: the graph gives nothing, the config does
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)
            self.config = types.SimpleNamespace(num_hidden_layers=3, num_attention_heads=8,
                                                num_key_value_heads=2, hidden_size=64)

        def forward(self, x):
            return self.lin(x)

    a = fusion.analyze(Projection().eval(), (torch.randn(2, 16, 64),), measure=False)
    assert a.kv_sites == [] and a.kv_source == "model.config"
    assert a.kv_cache_bytes(1, 100) == 100 * 2 * 3 * 2 * (64 // 8) * FP32
    del a.model.config
    plain = fusion.analyze(a.model, (torch.randn(2, 16, 64),), measure=False)
    with pytest.raises(FusionInputError, match="no attention site"):
        plain.kv_cache_bytes(1, 100)
    assert plain.memory(2, 16)["kv_cache"] == 0.0


def test_kv_cache_graph_agrees_with_hf_config():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    a = fusion.analyze(transformers.LlamaForCausalLM(cfg).eval(), (torch.randint(0, 128, (2, 32)),), measure=False)
    assert len(a.kv_sites) == 2                                     # one per layer, found in the graph
    assert a.kv_bytes_per_token == a.kv_per_token_config == 2 * 2 * 2 * 16 * FP32


# ---------------------------------------------------------------------------------------------- memory
def test_peak_activations_keep_a_base_alive_through_its_views():
    class M(nn.Module):
        def forward(self, x):
            y = x.exp()                      # [N], read again later only through a view
            v = y.view(-1, 2)
            u = x.sin()
            return u + v.view(-1)

    n = 1 << 16
    a = fusion.analyze(M(), (torch.randn(n),), measure=False)
    assert a.peak_activation_bytes == 3 * n * FP32                  # y (via v), u and the output at once


def test_memory_vs_sequence_length_and_plot(tmp_path):
    torch.manual_seed(0)
    a = fusion.analyze(TinyDecoder().eval(), (torch.randn(2, 32, 64),), measure=False)
    assert a.memory(2, 32)["activations"] == a.peak_activation_bytes          # the analysed shape
    rows = [a.memory(1, s) for s in (16, 64, 128)]                            # captured again
    acts = [r["activations"] for r in rows]
    assert all(x is not None for x in acts) and acts[0] < acts[1] < acts[2]
    assert acts[2] > 3 * acts[1]             # the [S, S] scores make it super-linear
    assert all(r["weights"] == a.weight_bytes and r["total"] > r["weights"] for r in rows)
    png = a.memory_plot(str(tmp_path / "memory.png"), batch=1, seqs=[16, 64, 128])
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- before/after
def test_compare_before_after(tmp_path):
    torch.manual_seed(0)
    model, x = TinyDecoder().eval(), torch.randn(2, 32, 64)
    opt = fusion.optimize(model, (x,))
    cmp = fusion.compare(opt, end_to_end_repeat=3)
    d = cmp.to_dict()
    b, a = d["before"], d["after"]
    assert a["fused_kernels"] >= 1 and b["fused_kernels"] == 0
    assert a["kernels"] < b["kernels"] and a["bytes"] < b["bytes"]
    assert a["flops"] == pytest.approx(b["flops"], rel=0.05)
    for side in (a, b):
        assert side["measured_s"] > 0 and side["measured_end_to_end_s"] > 0 and side["predicted_s"] > 0
    assert d["after_over_before"]["kernels"] == pytest.approx(a["kernels"] / b["kernels"])
    text = cmp.table()
    assert "kernels launched" in text and max(len(line) for line in text.splitlines()) <= 100
    # the same numbers through Analysis.compare
    again = fusion.analyze(model, (x,), measure=False).compare(fusion.analyze(opt, measure=False))
    assert again.to_dict()["after"]["kernels"] == a["kernels"]
    assert again.to_dict()["before"]["bytes"] == b["bytes"]
    png = cmp.roofline_plot(str(tmp_path / "before_after.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- MBU
def test_fused_kernel_mbu_agrees_with_the_bench(monkeypatch):
    """softmax 4096x1024 as bench/run.py runs a micro case: the analysis' MBU of the one fused kernel uses
    the bench's byte count (inputs read once + output written once), the same profile and the same
    function, and agrees with the bench's measured figure."""
    from bench.cases import _micro, min_bytes, softmax_hand
    from bench.run import bandwidth_figures, run_case
    from fusion.costmodel.profile_store import load_or_calibrate

    class Softmax(nn.Module):
        def forward(self, x):
            return softmax_hand(x)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # one thread: shared CI machines barely disturb it
    try:
        x = torch.randn(4096, 1024)     # 32 MB moved: a call's fixed cost (guards, wrapper) is ~1 % of it
        opt = fusion.optimize(Softmax(), (x,), config=fusion.Config(num_threads=1))
        a = fusion.analyze(opt, repeat=15)
        kernels = [s for s in a.calls if s.kind == "kernel"]
        assert len(kernels) == 1 and len(a.calls) == 1           # the whole softmax is one kernel
        k = kernels[0]
        hw = load_or_calibrate()
        assert a.hw.copy_bandwidth == hw.copy_bandwidth          # the profile the bench divides by
        assert k.bytes == min_bytes((x,), opt(x)) == 2 * 4096 * 1024 * FP32
        assert a.mbu(k) == pytest.approx(bandwidth_figures(k.bytes, k.measured_s, hw.copy_bandwidth)["frac_copy_bw"])
        args = types.SimpleNamespace(warmup=2, budget=0.3, model_budget=1.0, min_repeat=15, max_repeat=60,
                                     repeat=None, verbose=False, threads=torch.get_num_threads())
        case = _micro("softmax_4k", "hand-written softmax, 4096x1024", softmax_hand, (4096, 1024))
        analysed, benched = a.mbu(k), 0.0
        for attempt in range(5):   # contention only ever slows a run down: the best of a few runs of each
            rec = run_case(case, ["fusion"], args, hw.copy_bandwidth, hw)
            bench = rec["results"]["fusion"]
            assert "error" not in bench and not bench.get("fallback")
            assert rec["min_bytes"] == k.bytes
            benched = max(benched, bench["frac_copy_bw"])
            if attempt:
                again = fusion.analyze(opt, repeat=15)
                analysed = max(analysed, again.mbu([s for s in again.calls if s.kind == "kernel"][0]))
            # the bench times a whole call (Dynamo guards + program), the analysis the kernel alone
            print(f"\nMBU: analysis {analysed:.3f}, bench {benched:.3f}")
            if analysed == pytest.approx(benched, rel=0.25):
                break
        assert analysed == pytest.approx(benched, rel=0.25)
    finally:
        torch.set_num_threads(threads)


def test_a_program_restored_from_the_cache_counts_as_the_fresh_one(tmp_path):
    """A lowered program restored from the cache carries no shapes: the analysis takes them from the program
    before lowering (weights included), so every GEMM counts its FLOPs as in the fresh compile."""
    torch.manual_seed(0)
    model, x = TinyDecoder().eval(), torch.randn(2, 32, 64)
    cfg = fusion.Config(cache_dir=str(tmp_path))
    fresh = fusion.analyze(fusion.optimize(model, (x,), config=cfg), measure=False)
    opt = fusion.optimize(model, (x,), config=cfg)
    assert any("restored" in p.detail for g in opt.graphs for p in g.log.passes)
    restored = fusion.analyze(opt, measure=False)
    assert [(s.name, s.flops, s.bytes) for s in restored.calls] == [(s.name, s.flops, s.bytes) for s in fresh.calls]
