"""Real HF transformers models, built from configs with random weights, end to end through the backend."""
import pytest
import torch

transformers = pytest.importorskip("transformers")


def _tiny(kind: str, layers: int = 2):
    common = dict(num_hidden_layers=layers, num_attention_heads=4, hidden_size=64, intermediate_size=128,
                  vocab_size=256, max_position_embeddings=128, attn_implementation="eager")
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(**common)).eval()
    if kind == "llama":
        return transformers.LlamaModel(transformers.LlamaConfig(num_key_value_heads=2, **common)).eval()
    cfg = transformers.GPT2Config(n_layer=layers, n_head=4, n_embd=64, vocab_size=256, n_positions=128,
                                  attn_implementation="eager")
    return transformers.GPT2Model(cfg).eval()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_gpt2_end_to_end_through_backend():
    torch.manual_seed(0)
    model = _tiny("gpt2")
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
        torch._dynamo.reset()
        out = torch.compile(model, backend="fusion")(ids).last_hidden_state
    assert _rel(out, ref) <= 1e-4


def test_gpt2_training_step_matches_eager():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=256, n_positions=64,
                                  attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    ref = transformers.GPT2LMHeadModel(cfg)
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 256, (2, 16))
    torch._dynamo.reset()
    loss = torch.compile(model, backend="fusion")(ids, labels=ids).loss
    loss.backward()
    loss_ref = ref(ids, labels=ids).loss
    loss_ref.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-4 * abs(loss_ref.item())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is None:
            continue
        assert _rel(p.grad, q.grad) <= 1e-4, name


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_hf_models_optimize(kind):
    torch.manual_seed(0)
    model = _tiny(kind, layers=4)
    ids = torch.randint(0, 256, (4, 64))
    import fusion

    with torch.no_grad():
        ref = model(ids).last_hidden_state
        opt = fusion.optimize(model, (ids,))
        out = opt(ids).last_hidden_state
    assert _rel(out, ref) <= 1e-4
