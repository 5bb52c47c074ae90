"""The benchmark cases: hand-written fp32 micro kernels and small HF transformers models.

Each case builds (fn, inputs) on demand; fn(*inputs) returns one tensor. Micro cases also give the
minimal bytes any implementation must move (each input read once + the output written once).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# the micro programs and their inputs are fusion.workloads.micro's (shared with bench/gpu.py and the
# cost-model validation); the functions are re-exported for callers that build their own cases
from fusion.workloads.micro import MICRO as _MICRO
from fusion.workloads.micro import (  # noqa: F401
    attn_softmax,
    gelu_bias_residual,
    layernorm_F,
    layernorm_hand,
    random_inputs,
    rmsnorm_llama,
    softmax_hand,
    softmax_values,
    swiglu,
)


@dataclass
class Case:
    name: str
    kind: str                                   # "micro" | "model"
    desc: str
    make: Callable[[], tuple[Callable, tuple]]  # -> (fn, inputs)


def tensor_bytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def min_bytes(inputs: tuple, out: torch.Tensor) -> int:
    """Inputs read once + output written once (the compulsory traffic of a perfectly fused kernel)."""
    return tensor_bytes(*(t for t in inputs if isinstance(t, torch.Tensor))) + tensor_bytes(out)


# ---------------------------------------------------------------------------------------------- micro
def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _micro(name, desc, fn, *shapes, mask_shape=None):
    """A micro Case: fn on standard-normal inputs of `shapes` (seed 0), then the causal mask of mask_shape."""
    def make():
        return fn, random_inputs(list(shapes), _g(), mask_shape)

    return Case(name, "micro", desc, make)


MICRO = [_micro(c.name, c.describe(), c.fn, *c.data_shapes(), mask_shape=c.mask_shape()) for c in _MICRO.values()]


# ---------------------------------------------------------------------------------------------- models
class LastHidden(torch.nn.Module):
    """model(input_ids=ids).last_hidden_state, with no KV cache object in the output."""

    def __init__(self, model, use_cache_arg: bool):
        super().__init__()
        self.model = model
        self.use_cache_arg = use_cache_arg

    def forward(self, ids):
        if self.use_cache_arg:
            return self.model(input_ids=ids, use_cache=False).last_hidden_state
        return self.model(input_ids=ids).last_hidden_state


def _model(name, desc, build, batch, seq, use_cache_arg=True):
    def make():
        torch.manual_seed(0)
        model = LastHidden(build(), use_cache_arg).eval()
        ids = torch.randint(0, 1000, (batch, seq), generator=_g(1))
        return model, (ids,)

    return Case(name, "model", desc, make)


def _bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(num_hidden_layers=4), add_pooling_layer=False)


def _gpt2(layers, positions=1024):
    def build():
        from transformers import GPT2Config, GPT2Model

        return GPT2Model(GPT2Config(n_layer=layers, n_positions=positions))

    return build


def _llama():
    from transformers import LlamaConfig, LlamaModel

    # LLaMA-7B's 4096 hidden / 11008 MLP is too big for 2 cores; same architecture at BERT-base width.
    return LlamaModel(LlamaConfig(num_hidden_layers=4, hidden_size=768, intermediate_size=2048,
                                  num_attention_heads=12, num_key_value_heads=12, vocab_size=32000,
                                  max_position_embeddings=2048))


def _gpt_neo():
    from transformers import GPTNeoConfig, GPTNeoModel

    # where-mask attention (causal, dtype-min fill) + additive padding mask, global and local layers
    return GPTNeoModel(GPTNeoConfig(num_layers=4, attention_types=[[["global", "local"], 2]], hidden_size=768,
                                    num_heads=12, vocab_size=32000, max_position_embeddings=2048))


def _bloom():
    from transformers import BloomConfig, BloomModel

    return BloomModel(BloomConfig(n_layer=4, hidden_size=768, n_head=12))   # alibi scores through baddbmm


def _t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(num_layers=4))   # t5-small width; relative-position bias as the mask


class Pooled(torch.nn.Module):
    """An HF vision model's pooled output for pixel values."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model(pixel_values=pixels).pooler_output


def _resnet():
    from transformers import ResNetConfig, ResNetModel

    # ResNet-18's layout (basic blocks, 2 per stage): convolutions stay ATen; batch norm + ReLU + residual fuse
    return ResNetModel(ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                    layer_type="basic"))


def _vit():
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(num_hidden_layers=4))     # ViT-base width, patch 16, 224x224


def _vision(name, desc, build, batch, size):
    def make():
        torch.manual_seed(0)
        model = Pooled(build()).eval()
        g = _g(1)
        for mod in model.modules():  # trained-like running statistics, not the fresh 0/1
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
        return model, (torch.randn(batch, 3, size, size, generator=g),)

    return Case(name, "model", desc, make)


# HF's default config (its default attention implementation, SDPA; its default use_cache), as users run them
MODELS = [
    _model("bert", "BertModel 4 layers (base width), HF defaults, batch 4 seq 128", _bert, 4, 128, False),
    _model("gpt2", "GPT2Model 4 layers (base width), HF defaults, batch 4 seq 128", _gpt2(4), 4, 128, False),
    _model("llama", "LlamaModel 4 layers, hidden 768, MLP 2048, 12 heads, HF defaults, batch 4 seq 128",
           _llama, 4, 128, False),
    _model("gpt_neo", "GPTNeoModel 4 layers (global+local), hidden 768, 12 heads, HF defaults, batch 4 seq 128",
           _gpt_neo, 4, 128, False),
    _model("bloom", "BloomModel 4 layers, hidden 768, 12 heads (alibi), HF defaults, batch 4 seq 128", _bloom, 4,
           128, False),
    _model("t5_encoder", "T5EncoderModel 4 layers (t5-small width, relative bias), HF defaults, batch 4 seq 128",
           _t5, 4, 128, False),
    _vision("vit", "ViTModel 4 layers (base width, patch 16), HF defaults, batch 8, 3x224x224", _vit, 8, 224),
    _vision("resnet18", "ResNetModel, ResNet-18 layout (HF config, basic blocks), batch 8, 3x112x112", _resnet, 8, 112),
    _model("gpt2_long", "GPT2Model 2 layers (n_positions 2048), HF defaults, batch 1 seq 2048", _gpt2(2, 2048), 1,
           2048, False),
]

ALL = {c.name: c for c in MICRO + MODELS}
