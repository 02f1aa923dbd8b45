"""GPO's preference predictor: a transformer neural process over (option embedding, probability) tokens.

A batch holds one episode per item in a padded [B, T] layout: context tokens carry the group's
probability for their option, target tokens carry 0 and are predicted. Every token attends to the
context tokens only, so targets never see each other and predicting them together equals predicting
each alone. Parameter names match GPO's released model (`embedder`, `encoder.layers.i.*` as in
`nn.TransformerEncoder`, `predictor`), so its checkpoints load and the built-in layer can check ours.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import ModelConfig, Prediction, Predictor, context_keys, segment_softmax


class ContextAttentionLayer(nn.TransformerEncoderLayer):
    """`nn.TransformerEncoderLayer` (post-norm) whose keys and values are the context tokens only.

    Queries are any tokens; keys/values are the first K columns of `h`, of which `key_mask` [B, K]
    marks the real context tokens. This is the built-in layer with a mask that allows exactly those
    keys, minus the attention and K/V projections it would spend on keys that are masked out anyway.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config.d_model, config.num_heads, config.dim_feedforward, config.dropout,
                         activation="relu", batch_first=True, norm_first=False)

    def forward(self, queries: Tensor, h: Tensor, key_mask: Tensor) -> Tensor:  # type: ignore[override]
        x = self.norm1(queries + self._context_attention(queries, h[:, :key_mask.shape[1]], key_mask))
        return self.norm2(x + self._ff_block(x))

    def _context_attention(self, queries: Tensor, keys: Tensor, key_mask: Tensor) -> Tensor:
        attn = self.self_attn
        (B, Q, d), K, H = queries.shape, keys.shape[1], attn.num_heads
        w, b = attn.in_proj_weight, attn.in_proj_bias
        q = F.linear(queries, w[:d], b[:d]).view(B, Q, H, d // H).transpose(1, 2)
        k, v = F.linear(keys, w[d:], b[d:]).view(B, K, 2, H, d // H).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                             dropout_p=attn.dropout if self.training else 0.0)
        return self.dropout1(attn.out_proj(out.transpose(1, 2).reshape(B, Q, d)))


class ContextEncoder(nn.Module):
    """A stack of `ContextAttentionLayer`s; named like `nn.TransformerEncoder` (`layers.i.*`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ContextAttentionLayer(config) for _ in range(config.num_layers))

    def forward(self, h: Tensor, is_context: Tensor, is_target: Tensor) -> Tensor:
        """The last layer's output for the target tokens, [n_targets, d] in `is_target.nonzero()`
        order. Nothing reads the context tokens' last-layer output, so that layer only takes the
        targets as queries (gathered to [B, max targets per item])."""
        key_mask = context_keys(is_context)
        for layer in self.layers[:-1]:
            h = layer(h, h, key_mask)
        n_targets = is_target.sum(1)
        columns = torch.sort((~is_target).to(torch.uint8), dim=1, stable=True).indices[:, :int(n_targets.max())]
        targets = h.gather(1, columns.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        out = self.layers[-1](targets, h, key_mask)
        return out[torch.arange(columns.shape[1], device=h.device) < n_targets[:, None]]


class GPOPredictor(Predictor):
    """Maps a padded batch of episodes to a per-target Gaussian over each option's probability."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        mlp: list[nn.Module] = [nn.Linear(config.input_dim + 1, d), nn.ReLU()]
        for _ in range(config.embed_depth - 2):
            mlp += [nn.Linear(d, d), nn.ReLU()]
        self.embedder = nn.Sequential(*mlp, nn.Linear(d, d))
        self.encoder = ContextEncoder(config)
        self.predictor = nn.Sequential(nn.Linear(d, config.dim_feedforward), nn.ReLU(),
                                       nn.Linear(config.dim_feedforward, 2))

    def embed(self, x: Tensor, y_in: Tensor) -> Tensor:
        """Embedder MLP on the tokens [x ; y]; the first layer is split so the wide x is never
        copied into a concatenation (same weights, same result)."""
        first = self.embedder[0]
        h = F.linear(x, first.weight[:, :-1], first.bias) + y_in.unsqueeze(-1) * first.weight[:, -1]
        return self.embedder[1:](h)

    def forward(self, x: Tensor, y_in: Tensor, is_context: Tensor, is_target: Tensor,
                segment: Tensor) -> Prediction:
        """x [B,T,D] float, y_in [B,T] (0 on targets), is_context/is_target [B,T] bool, segment [B,T]
        int (equal ids = same question, unique across the batch). Padding tokens are neither context
        nor target; they are computed (finite) and then ignored."""
        self.check_input(x)
        h = self.encoder(self.embed(x, y_in), is_context, is_target)
        where = is_target.nonzero(as_tuple=True)
        logits, log_std = self.predictor(h).unbind(-1)
        zeros = torch.zeros(is_target.shape, dtype=h.dtype, device=h.device)
        return Prediction(zeros.index_put(where, segment_softmax(logits, segment[where])),
                          zeros.index_put(where, log_std))


    def loss(self, pred: Prediction, y_true: Tensor, is_target: Tensor) -> Tensor:
        return gaussian_nll(pred, y_true, is_target)


def gaussian_nll(pred: Prediction, y_true: Tensor, is_target: Tensor) -> Tensor:
    """Gaussian negative log-likelihood of the true probabilities, averaged over the real target
    tokens of the whole batch (GPO sums per item and averages items; a per-token mean does not let
    episodes with many options dominate and keeps the scale independent of the episode size)."""
    if not bool(is_target.any()):
        raise ValueError("the batch has no target token, so there is nothing to score")
    var = (2.0 * pred.log_std[is_target]).exp()
    return F.gaussian_nll_loss(pred.mean[is_target], y_true[is_target], var, full=True, reduction="mean")
