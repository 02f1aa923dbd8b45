"""The centralized baseline: the same predictor trained on the pooled training groups.

As in the authors' code, one epoch is ONE gradient step on a batch holding an episode of every
training group; a federated round holds local-steps episodes of every group, so it does local-steps
times the work of an epoch. `compute_matched` runs num-server-rounds x local-steps epochs: the same
episodes (forward/backward work and data seen) as the federated run, evaluated at the same work.
With run-config resume=true a stopped run continues from its last checkpoint, with the optimizer's and
the episode streams' states saved beside it, so it ends with the numbers of an uninterrupted run.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import RunConfig
from .data import seeded_rng
from .experiment import Experiment, fmt_gain, prepare_experiment, resolve_device
from .results import ResultsWriter, claim_run_dir, load_trainer_state, out_dir_for
from .training import lr_factor, train_steps

log = logging.getLogger(__name__)


def train_centralized(cfg: RunConfig, exp: Experiment | None = None, *, compute_matched: bool = False,
                      progress: bool = True, overwrite: bool = False) -> ResultsWriter:
    """Train and evaluate every `eval-every` epochs; when matched, also every `eval-every` rounds'
    work, so the run holds the reference run (epochs = rounds) as its beginning. History rounds are
    epochs in both cases. The out-dir is checked first (`results.claim_run_dir`; `overwrite`)."""
    scale = cfg.local_steps if compute_matched else 1
    total, every = cfg.num_server_rounds * scale, cfg.eval_every * scale
    method = "centralized-matched" if compute_matched else "centralized"
    out = out_dir_for(cfg, method)
    aside = claim_run_dir(cfg, out, overwrite=overwrite, method=method, last_round=total)
    if aside:
        print(f"the earlier run in {out} is kept in {aside}", flush=True)
    exp = exp or prepare_experiment(cfg, progress)
    device = resolve_device(cfg.device)
    n_clients = len(exp.split.train)
    model = exp.build_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    groups = [exp.vectors(g, "train") for g in exp.split.train]
    rng = seeded_rng(cfg.seed, method)
    same_questions = seeded_rng(cfg.seed, method, "questions") if cfg.episode_sampler == "same-questions" else None
    streams = {"rng": rng, "questions": same_questions}

    def evaluate(step: int, losses: list[float]) -> dict:
        entry = {"round": step, "gradient_steps": step, "episodes": step * n_clients * cfg.episodes_per_step,
                 "train_loss": float(np.mean(losses)) if losses else None, **exp.evaluate(model, device)}
        state = {"optimizer": optimizer.state_dict(),
                 **{k: s.bit_generator.state for k, s in streams.items() if s is not None}}
        return writer.record(entry, model.state_dict(), trainer_state=state)

    if cfg.resume:
        writer, weights, start = ResultsWriter.resume(out, cfg, method=method, last_round=total)
        state = load_trainer_state(writer.out_dir, start)
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        for key, stream in streams.items():
            if stream is not None:
                stream.bit_generator.state = state[key]
    else:
        writer, start = ResultsWriter(out, method, cfg, exp.split.train, exp.split.eval,
                                      exp.baselines(), checkpoint_metadata=exp.checkpoint_metadata()), 0
        evaluate(0, [])
    losses: list[float] = []
    bar = tqdm(range(start + 1, total + 1), desc=method, unit="step", disable=not progress, initial=start, total=total)
    for step in bar:
        for param_group in optimizer.param_groups:
            param_group["lr"] = cfg.lr * lr_factor(step - 1, total, cfg.lr_schedule, cfg.warmup_steps)
        losses += train_steps(model, optimizer, groups, 1, exp.sizes, rng, device, same_questions=same_questions,
                              episodes_per_step=cfg.episodes_per_step)
        if step % every == 0 or step == total or (step <= cfg.num_server_rounds and step % cfg.eval_every == 0):
            entry = evaluate(step, losses)
            bar.set_postfix(alignment=f"{entry['alignment']:.4f}", gain=fmt_gain(entry), loss=f"{entry['train_loss']:.3f}")
            losses = []
    return writer

