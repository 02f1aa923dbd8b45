"""The residual neural process: a shared prior answer, corrected by how the group departs from it.

Every option gets a prior logit from its features (what an average group answers). On the context
questions the group's deviation from that prior (its answer minus the prior probability) is known;
each target option attends over the context options (queries and keys from the options' features)
and reads a correction to its prior logit from the deviations of the options it resembles. A group
that answers "very important" more often than the prior expects on context questions gets that
shift on similar options of new questions. With no informative context the correction is learned to
vanish, so the model degrades to its prior rather than to noise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import ModelConfig, Prediction, Predictor, context_keys, cross_entropy, option_mlp, segment_softmax


class ResidualPredictor(Predictor):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d, self.heads = config.d_model, config.num_heads
        self.trunk = option_mlp(config, d)
        self.prior = nn.Linear(d, 1)
        self.query, self.key = nn.Linear(d, d), nn.Linear(d, d)
        self.value = nn.Sequential(nn.Linear(d + 2, config.dim_feedforward), nn.ReLU(),
                                   nn.Linear(config.dim_feedforward, d))
        self.correction = nn.Sequential(nn.Linear(2 * d, config.dim_feedforward), nn.ReLU(),
                                        nn.Linear(config.dim_feedforward, 1))

    def forward(self, x: Tensor, y_in: Tensor, is_context: Tensor, is_target: Tensor,
                segment: Tensor) -> Prediction:
        self.check_input(x)
        real = is_context | is_target
        h = self.trunk(x)                                             # [B, T, d]
        prior_logit = self.prior(h).squeeze(-1)
        prior = torch.zeros_like(prior_logit).masked_scatter(real, segment_softmax(prior_logit[real], segment[real]))
        keys = context_keys(is_context)
        K = keys.shape[1]
        deviation = torch.stack([y_in - prior, y_in], -1)[:, :K] * keys[..., None]
        B, T, d = h.shape
        H = self.heads
        q = self.query(h).view(B, T, H, d // H).transpose(1, 2)
        k = self.key(h[:, :K]).view(B, K, H, d // H).transpose(1, 2)
        v = self.value(torch.cat([h[:, :K], deviation], -1)).view(B, K, H, d // H).transpose(1, 2)
        read = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :])
        read = read.transpose(1, 2).reshape(B, T, d)
        logit = prior_logit + self.correction(torch.cat([h, read], -1)).squeeze(-1)
        out = torch.zeros_like(logit).masked_scatter(is_target, segment_softmax(logit[is_target], segment[is_target]))
        return Prediction(out)

    def loss(self, pred: Prediction, y_true: Tensor, is_target: Tensor) -> Tensor:
        return cross_entropy(pred, y_true, is_target)
