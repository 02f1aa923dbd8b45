import copy
import math

import pytest
import torch
from torch import nn

from pluralllm_flwr.gpo import GPOPredictor, gaussian_nll
from pluralllm_flwr.model import ModelConfig

torch.set_num_threads(1)
CONFIG = ModelConfig(input_dim=12, d_model=32, embed_depth=3, num_layers=2, num_heads=4, dim_feedforward=24)


def random_batch(seed, items=((3, 4), (1, 6), (8, 2), (2, 1)), dim=12, shuffle=True):
    """Padded batch where item b has items[b] = (context questions, target questions) of 1-5 options.
    Token order inside an item is shuffled (the model must not rely on the context coming first)
    and padding holds garbage (it must not leak)."""
    g = torch.Generator().manual_seed(seed)
    per_item = []
    next_id = 0
    for n_ctx, n_tgt in items:
        sizes = torch.randint(1, 6, (n_ctx + n_tgt,), generator=g)
        seg = next_id + torch.repeat_interleave(torch.arange(n_ctx + n_tgt), sizes)
        next_id += n_ctx + n_tgt
        ctx = seg < next_id - n_tgt
        order = torch.randperm(len(seg), generator=g) if shuffle else torch.arange(len(seg))
        per_item.append((seg[order], ctx[order]))
    B, T = len(items), max(len(s) for s, _ in per_item) + 3
    x = torch.randn(B, T, dim, generator=g)
    y_true = torch.rand(B, T, generator=g)
    segment = torch.full((B, T), -1, dtype=torch.long)
    is_context = torch.zeros(B, T, dtype=torch.bool)
    for b, (seg, ctx) in enumerate(per_item):
        segment[b, :len(seg)], is_context[b, :len(seg)] = seg, ctx
    is_target = (segment >= 0) & ~is_context
    y_in = torch.where(is_target, 0.0, y_true)   # garbage y on padding, 0 on targets
    return x, y_in, y_true, is_context, is_target, segment


def loop_loss(ref, x, y_in, y_true, is_context, is_target, segment):
    """The plain reference: per item, only its real tokens through the built-in encoder with a mask
    allowing context keys; per target question, a Python softmax; NLL per token, mean over tokens."""
    total, count = 0.0, 0
    for b in range(x.shape[0]):
        real = (is_context[b] | is_target[b]).nonzero().flatten()
        tokens = torch.cat([x[b, real], y_in[b, real, None]], dim=-1)
        blocked = ~is_context[b, real].expand(len(real), len(real))   # True = may not attend
        h = ref.encoder(ref.embedder(tokens), mask=blocked)
        out = ref.predictor(h)
        for q in segment[b, real][is_target[b, real]].unique():
            rows = ((segment[b, real] == q) & is_target[b, real]).nonzero().flatten()
            logits = out[rows, 0]
            mean = torch.exp(logits) / torch.exp(logits).sum()
            std = torch.exp(out[rows, 1])
            y = y_true[b, real][rows]
            nll = 0.5 * math.log(2 * math.pi) + torch.log(std) + 0.5 * ((y - mean) / std) ** 2
            total, count = total + nll.sum(), count + len(rows)
    return total / count


def reference_copy(model):
    """Embedder and head copied, encoder as the built-in `nn.TransformerEncoder` with the same weights."""
    ref = nn.Module()
    ref.embedder, ref.predictor = copy.deepcopy(model.embedder), copy.deepcopy(model.predictor)
    layer = nn.TransformerEncoderLayer(CONFIG.d_model, CONFIG.num_heads, CONFIG.dim_feedforward, 0.0,
                                       batch_first=True)
    ref.encoder = nn.TransformerEncoder(layer, CONFIG.num_layers, enable_nested_tensor=False)
    ref.load_state_dict(model.state_dict())
    return ref


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradients_equal_a_per_question_loop(seed):
    torch.manual_seed(seed)
    model = GPOPredictor(CONFIG)
    batch = random_batch(seed)
    x, y_in, y_true, is_context, is_target, segment = batch
    loss = gaussian_nll(model(x, y_in, is_context, is_target, segment), y_true, is_target)
    ref = reference_copy(model)
    expected = loop_loss(ref, *batch)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    loss.backward()
    expected.backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_shapes_and_per_question_softmax():
    torch.manual_seed(0)
    x, y_in, y_true, is_context, is_target, segment = random_batch(3)
    pred = GPOPredictor(CONFIG)(x, y_in, is_context, is_target, segment)
    assert pred.mean.shape == pred.log_std.shape == is_target.shape
    assert (pred.mean[~is_target] == 0).all() and (pred.log_std[~is_target] == 0).all()
    assert (pred.mean[is_target] > 0).all()
    for q in segment[is_target].unique():
        assert pred.mean[(segment == q) & is_target].sum().item() == pytest.approx(1.0, abs=1e-6)


def test_targets_see_only_the_context():
    torch.manual_seed(0)
    model = GPOPredictor(CONFIG)
    x, y_in, _, is_context, is_target, segment = random_batch(4, items=((3, 5),), shuffle=False)
    base = model(x, y_in, is_context, is_target, segment).mean
    first_target = segment[0, is_target[0]][0]
    moved = x.clone()
    moved[0, segment[0] == first_target] += 3.0
    after = model(moved, y_in, is_context, is_target, segment).mean
    others = is_target & (segment != first_target)
    torch.testing.assert_close(after[others], base[others], atol=1e-6, rtol=0)
    assert not torch.allclose(after[segment == first_target], base[segment == first_target])
    moved_ctx = x.clone()
    moved_ctx[is_context] += 3.0
    assert not torch.allclose(model(moved_ctx, y_in, is_context, is_target, segment).mean[others], base[others])


def test_heavy_padding_gives_finite_loss_and_gradients():
    torch.manual_seed(0)
    model = GPOPredictor(CONFIG)
    x, y_in, y_true, is_context, is_target, segment = random_batch(5, items=((1, 1), (30, 30)))
    loss = gaussian_nll(model(x, y_in, is_context, is_target, segment), y_true, is_target)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_item_without_context_is_an_error():
    model = GPOPredictor(CONFIG)
    x, y_in, _, is_context, is_target, segment = random_batch(6)
    is_context[1] = False
    with pytest.raises(ValueError, match=r"batch items \[1\] have no context"):
        model(x, y_in, is_context, is_target, segment)


def test_loss_without_targets_is_an_error():
    x, y_in, y_true, is_context, is_target, segment = random_batch(8)
    pred = GPOPredictor(CONFIG)(x, y_in, is_context, is_target, segment)
    with pytest.raises(ValueError, match="no target"):
        gaussian_nll(pred, y_true, torch.zeros_like(is_target))


def test_wrong_input_width_is_an_error():
    x, y_in, _, is_context, is_target, segment = random_batch(7, dim=5)
    with pytest.raises(ValueError, match="input_dim=12"):
        GPOPredictor(CONFIG)(x, y_in, is_context, is_target, segment)


def test_config_defaults_and_validation():
    c = ModelConfig(input_dim=4096)
    assert (c.d_model, c.embed_depth, c.num_layers, c.num_heads, c.dim_feedforward, c.dropout) == (128, 4, 6, 4, 128, 0.0)
    model = GPOPredictor(c)
    assert sum(isinstance(m, nn.Linear) for m in model.embedder) == 4 and len(model.encoder.layers) == 6
    with pytest.raises(ValueError, match="multiple of num_heads"):
        ModelConfig(input_dim=8, d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="input_dim"):
        ModelConfig(input_dim=0)
