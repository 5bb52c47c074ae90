"""Inference batch norm becomes pointwise ops over the channel dim (capture.normalize), so it fuses with
ReLU and residual adds; training-mode batch norm is left to ATen."""
import pytest
import torch
import torch.nn as nn

import fusion


class ConvBlock(nn.Module):
    def __init__(self, c=8, affine=True, dims=2):
        super().__init__()
        Conv, BN = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.conv = Conv(c, c, 3, padding=1, bias=False)
        self.bn = BN(c, affine=affine)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


def _randomise(m):
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g))
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            if mod.affine:
                mod.weight.data.copy_(torch.randn(mod.num_features, generator=g))
                mod.bias.data.copy_(torch.randn(mod.num_features, generator=g))
    return m.eval()


@pytest.mark.parametrize("dims,affine,shape", [(2, True, (2, 8, 13, 11)), (2, False, (1, 8, 5, 1)), (1, True, (3, 8, 17))])
def test_eval_batch_norm_fuses_with_relu_and_residual(dims, affine, shape, assert_close):
    m = _randomise(ConvBlock(affine=affine, dims=dims))
    x = torch.randn(*shape)
    opt = fusion.optimize(m, (x,))
    code = opt.graphs[0].gm.code
    assert "batch_norm" not in code
    big = [k for k in opt.graphs[0].log.kernels if any(n.startswith("relu") for n in k.nodes)]  # (relu_1: NHWC)
    assert len(big) == 1 and {"sub", "mul", "add", "relu"} <= {n.split("_")[0] for n in big[0].nodes}  # BN + add + ReLU
    assert_close(opt(x), m(x))
    with torch.no_grad():
        torch._dynamo.reset()
        assert_close(torch.compile(m, backend="fusion")(x), m(x))


def test_training_batch_norm_stays_aten_and_trains(assert_close):
    m = _randomise(ConvBlock()).train()
    ref = _randomise(ConvBlock()).train()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 8, 6, 6)
    torch._dynamo.reset()
    out = torch.compile(m, backend="fusion")(x)
    want = ref(x)
    assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    assert_close(m.conv.weight.grad, ref.conv.weight.grad)
    assert_close(m.bn.running_mean, ref.bn.running_mean)   # batch statistics were used and recorded


def test_pointwise_kernels_coalesce_the_last_two_dims_where_every_operand_allows(assert_close):
    """NCHW with per-channel operands: the kernel runs rows of H*W (not W) — same values, also on inputs
    whose layout forbids it at run time (transposed); an operand that varies along W alone forbids it."""
    class PerChannel(torch.nn.Module):
        def forward(self, x, s, t):
            return torch.relu(x * s.view(1, -1, 1, 1) + t.view(1, -1, 1, 1))

    class AlongW(torch.nn.Module):
        def forward(self, x, v):
            return torch.sigmoid(torch.relu(x * v + 1.0) * 2.0 - v)

    x, s, t, v = torch.randn(2, 4, 5, 7), torch.randn(4), torch.randn(4), torch.randn(7)
    xt = torch.randn(2, 4, 7, 5).transpose(2, 3)
    for model, extra, coalesced in ((PerChannel(), (s, t), True), (AlongW(), (v,), False)):
        opt = fusion.optimize(model, (x, *extra), config=fusion.Config(structural_cache=False))
        assert_close(opt(x, *extra), model(x, *extra))
        assert_close(opt(xt, *extra), model(xt, *extra))
        sources = [k.call_source for k in opt.graphs[0].gm.modules() if getattr(k, "call_source", None)]
        assert sources, "expected a generated kernel"
        assert any("D2 * D3" in src for src in sources) == coalesced
