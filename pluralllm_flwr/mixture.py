"""The prototype-mixture predictor: a group's answers as a mixture of K learned answer prototypes.

Each prototype k is a head that gives every option a logit from the option's features; softmaxed
within the question, it is a full answer distribution P_k(option | question). A group is a vector of
mixture weights w over the prototypes, and its prediction is Σ_k w_k P_k. The weights are not
learned per group (held-out groups are new): they are fitted to the group's context answers inside
the forward pass, by a few EM steps on the context log-likelihood under a Dirichlet prior centred on
learned prior weights. EM is differentiable, so the prototypes learn to be the directions along
which groups differ. With no context the prediction is the prior mixture; the more context, the
more the group's own answers decide.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import ModelConfig, Prediction, Predictor, cross_entropy, option_mlp, segment_softmax


class MixturePredictor(Predictor):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.heads = option_mlp(config, config.prototypes)
        self.prior_logits = nn.Parameter(torch.zeros(config.prototypes))
        self.prior_strength = nn.Parameter(torch.zeros(1))  # softplus -> Dirichlet pseudo-counts (1-d: Flower's
        # array records and its clipping mod handle 1-d arrays; a 0-d one escaped the clipping)

    def forward(self, x: Tensor, y_in: Tensor, is_context: Tensor, is_target: Tensor,
                segment: Tensor) -> Prediction:
        self.check_input(x)
        real = is_context | is_target
        item = real.nonzero(as_tuple=True)[0]                       # batch index of each real token
        prototypes = segment_softmax(self.heads(x[real]), segment[real])   # [N, K]
        weights = self.fit_weights(prototypes, y_in[real], is_context[real], item, x.shape[0])
        mean = (weights[item] * prototypes).sum(-1)
        out = torch.zeros(is_target.shape, dtype=mean.dtype, device=mean.device)
        return Prediction(out.masked_scatter(real, mean) * is_target)

    def fit_weights(self, prototypes: Tensor, y: Tensor, is_context: Tensor, item: Tensor, batch: int) -> Tensor:
        """MAP-EM for each item's mixture weights [B, K] from its context tokens' answers:
        w ← (Σ_context y·responsibility + α·π) / (n_context + α), started at the prior π."""
        prior = F.softmax(self.prior_logits, -1)
        alpha = F.softplus(self.prior_strength) + 1e-3
        weights = prior.expand(batch, -1)
        p, y_ctx, at = prototypes[is_context], y[is_context, None], item[is_context]
        n_context = torch.zeros(batch, 1, dtype=p.dtype, device=p.device).index_add(0, at, y_ctx)
        for _ in range(self.config.inference_steps):
            joint = weights[at] * p
            resp = joint / joint.sum(-1, keepdim=True).clamp_min(1e-12)
            counts = torch.zeros_like(weights).index_add(0, at, y_ctx * resp)
            weights = (counts + alpha * prior) / (n_context + alpha)
        return weights

    def loss(self, pred: Prediction, y_true: Tensor, is_target: Tensor) -> Tensor:
        return cross_entropy(pred, y_true, is_target)
