"""Hugging Face models end to end: which fusions fire on BERT, GPT-2 and LLaMA (eager attention,
2 layers, tiny hidden, random weights, no downloads), per layer, and that `explain()` lists each
rule with its count. Counts of fused ops in the rewritten graph, and numerics against eager."""
from __future__ import annotations

import re
import warnings
from collections import Counter

import pytest
import torch

import fusion
from fusion.config import Config
from fusion.dialect.ops import FUSED_OPS

transformers = pytest.importorskip("transformers")
LAYERS = 2


def bert():
    return transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=LAYERS, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=100,
        max_position_embeddings=64, attn_implementation="eager"))


def gpt2():
    return transformers.GPT2Model(transformers.GPT2Config(
        n_layer=LAYERS, n_embd=32, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager", use_cache=False))


def llama():   # grouped-query: 4 query heads share 2 kv heads
    return transformers.LlamaModel(transformers.LlamaConfig(
        num_hidden_layers=LAYERS, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64, attn_implementation="eager", use_cache=False))


def gpt_neo():   # where-mask (causal, dtype-min fill held as a tensor) + additive padding mask, no scaling
    return transformers.GPTNeoModel(transformers.GPTNeoConfig(
        num_layers=LAYERS, attention_types=[[["global", "local"], 1]], hidden_size=32, num_heads=4, vocab_size=100,
        max_position_embeddings=64, window_size=8))


def bloom():     # alibi through baddbmm on a flattened [B*H] batch, + the causal mask
    return transformers.BloomModel(transformers.BloomConfig(n_layer=LAYERS, hidden_size=32, n_head=4, vocab_size=100))


def t5():        # relative-position bias + padding mask, no scaling
    return transformers.T5EncoderModel(transformers.T5Config(
        num_layers=LAYERS, d_model=32, d_kv=8, num_heads=4, d_ff=64, vocab_size=100, attn_implementation="eager"))


#: fused ops per model: per layer, plus the ones outside the layers (embedding / final norms)
EXPECTED = {
    "bert": (bert, {"attention": 1, "layer_norm": 2, "gelu": 1}, {"layer_norm": 1}),
    "gpt2": (gpt2, {"attention": 1, "layer_norm": 2, "gelu": 1}, {"layer_norm": 1}),
    "llama": (llama, {"attention": 1, "rms_norm": 2, "swiglu": 1}, {"rms_norm": 1}),
    "gpt_neo": (gpt_neo, {"attention": 1, "layer_norm": 2, "gelu": 1}, {"layer_norm": 1}),
    "bloom": (bloom, {"attention": 1, "layer_norm": 2, "gelu": 1}, {"layer_norm": 2}),
    "t5": (t5, {"attention": 1, "rms_norm": 2}, {"rms_norm": 1}),
}
#: rules that must be reported by explain(), per model
RULES = {"bert": {"attention"}, "gpt2": {"attention", "gelu_tanh"}, "llama": {"attention", "rms_norm", "swiglu"},
         "gpt_neo": {"attention"}, "bloom": {"attention"}, "t5": {"attention", "rms_norm"}}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def optimized(request, tmp_path_factory):
    torch.manual_seed(0)
    build, per_layer, outside = EXPECTED[request.param]
    model = build().eval()
    ids = torch.randint(0, 100, (2, 12))
    config = Config(codegen="aten", fallback=False, cache_dir=str(tmp_path_factory.mktemp("cache")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fusion.optimize(model, (ids,), config)
    return request.param, model, ids, opt, per_layer, outside


def test_fused_op_counts_per_layer(optimized):
    name, _, _, opt, per_layer, outside = optimized
    got = Counter(FUSED_OPS[n.target] for g in opt.graphs for n in g.program_gm.graph.nodes if n.target in FUSED_OPS)
    want = Counter({op: n * LAYERS + outside.get(op, 0) for op, n in per_layer.items()})
    assert got == want, f"{name}: {got} != {want}\n{opt.graphs[0].program_gm.graph}"
    assert "softmax" not in got       # every softmax went into an attention


def test_numerics_match_eager(optimized):
    _, model, ids, opt, _, _ = optimized
    with torch.no_grad():
        ref, out = model(ids).last_hidden_state, opt(ids).last_hidden_state
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_explain_lists_each_rule_with_its_count(optimized):
    name, _, _, opt, _, _ = optimized
    text = opt.explain()
    fired = opt.graphs[0].log.fired
    assert RULES[name] <= set(fired), fired
    for rule, nodes in fired.items():
        assert re.search(rf"^\s+{rule}\s+replaced\s+{len(nodes)}\s+nodes", text, re.MULTILINE), f"{rule} ({len(nodes)} nodes) not in\n{text}"


def test_llama_attention_is_grouped_query(optimized):
    name, _, _, opt, _, _ = optimized
    if name != "llama":
        pytest.skip("grouped-query attention is LLaMA's")
    for n in opt.graphs[0].program_gm.graph.nodes:
        if n.target is torch.ops.fusion.attention.default:
            q, k, v = (a.meta["val"] for a in n.args[:3])
            assert (q.shape[1], k.shape[1], v.shape[1]) == (4, 2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_llama_bf16_norm_casts_stay_exact(dtype):
    """In bf16 LlamaRMSNorm casts to fp32 and back: the fp32 part fuses, the casts stay.
    Attention does not fuse in bf16: HF's eager softmax runs in fp32 between casts (`softmax(s, dtype=fp32).to(bf16)`),
    which SDPA does not reproduce bit for bit; casts are not modelled in the e-graph (a known gap)."""
    torch.manual_seed(0)
    model = llama().eval().to(dtype)
    ids = torch.randint(0, 100, (2, 12))
    opt = fusion.optimize(model, (ids,), Config(codegen="aten", fallback=False))
    got = Counter(FUSED_OPS[n.target] for n in opt.graphs[0].program_gm.graph.nodes if n.target in FUSED_OPS)
    assert got["rms_norm"] == 2 * LAYERS + 1 and got["swiglu"] == LAYERS   # silu in fp32 between casts is bf16 silu
    with torch.no_grad():
        ref, out = model(ids).last_hidden_state.float(), opt(ids).last_hidden_state.float()
    assert (out - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


SLOW = pytest.mark.slow   # the default suite keeps one alibi and one relative-bias model; the rest run with -m slow


@pytest.mark.parametrize("build", [pytest.param(bert, marks=SLOW), pytest.param(gpt_neo, marks=SLOW), bloom, t5,
                                   pytest.param(llama, marks=SLOW)], ids=lambda f: f.__name__)
def test_attention_fuses_under_dynamic_shapes_with_one_compile(build, tmp_path):
    """torch.compile(dynamic=True): symbolic batch and sequence sizes (and the float attributes Dynamo makes
    inputs, such as a norm's eps) still fuse, at two sequence lengths, from one compile."""
    import functools

    from fusion.torch_compile import fusion_backend

    torch.manual_seed(0)
    model = build().eval()
    got: list = []
    backend = functools.partial(fusion_backend, options={"codegen": "aten", "fallback": False,
                                                         "cache_dir": str(tmp_path)}, on_compiled=got.append)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for seq in (12, 20):
            ids = torch.randint(1, 100, (2, seq))
            out, ref = compiled(ids).last_hidden_state, model(ids).last_hidden_state
            assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item(), seq
    assert len(got) == 1, f"{len(got)} compiles"
    fused = Counter(FUSED_OPS[n.target] for n in got[0].program_gm.graph.nodes if n.target in FUSED_OPS)
    assert fused["attention"] == LAYERS and "softmax" not in fused, fused
