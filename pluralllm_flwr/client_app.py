"""The ClientApp: a SuperNode trains and evaluates the global predictor on the groups it hosts.

Which groups: in a deployment the node-config names the node's bundle (`bundle='/abs/path'`, written
by `pluralllm bundle`): the node hosts that one group and reads nothing but that file. In simulation
node `partition-id` p of `num-partitions` N hosts training groups p, p+N, p+2N, ... of the dataset,
so any number of virtual nodes covers every group. Each message names the one group it is for.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from .arrays import to_record, to_state_dict
from .bundle import BundleError, read_bundle
from .config import ConfigError, RunConfig
from .data import GroupSplit, seeded_rng
from .experiment import Experiment, bundle_experiment, prepare_experiment, resolve_device
from .grid import RUN_CONFIG
from .reward_queries import PREDICTIONS_QUERY, answer_query
from .strategies import CONTROL, CORRECTION, HOSTS_QUERY, UNIT_WEIGHT
from .model import ModelConfig, Predictor
from .predictors import build_predictor
from .training import ClientOptimizer, predict, train_steps
from .metrics import alignment, mean_excluding_nan


def with_stamped_run_config(msg: Message, context: Context, call_next) -> Message:
    """The run a message belongs to: a Flower run may execute several runs in turn (run-config
    `batch`), and the ServerApp stamps each message with its run's run-config (`grid.RunGrid`). This
    mod takes the stamp off, so handlers and Flower's mods see the message as the strategy built it
    (`fixedclipping_mod` wants exactly one ConfigRecord), and hands on a context whose run_config is
    that run's; an unstamped message keeps the Flower run's own."""
    if RUN_CONFIG in msg.content:
        context = dataclasses.replace(context, run_config=dict(msg.content.pop(RUN_CONFIG)))
    return call_next(msg, context)


app = ClientApp(mods=[with_stamped_run_config])


@functools.lru_cache(maxsize=2)
def _experiment(cfg: RunConfig) -> Experiment:
    """The whole dataset, loaded once per process (a Ray actor serves many rounds)."""
    return prepare_experiment(cfg, progress=False)


@functools.lru_cache(maxsize=2)
def _bundle_experiment(cfg: RunConfig, path: str) -> Experiment:
    """A deployed node's one group, from its bundle alone."""
    if not Path(path).is_absolute():
        raise BundleError(f"node-config bundle={path!r} must be an absolute path (the ClientApp is a separate process "
                          "whose working directory is Flower's choice)")
    bundle = read_bundle(path)
    return bundle_experiment(cfg, [bundle], GroupSplit([bundle.group], []))


def _setup(cfg: RunConfig, context: Context) -> tuple[Experiment, list[str]]:
    """The node's experiment and the training groups it hosts."""
    node = context.node_config
    if "bundle" in node:
        exp = _bundle_experiment(cfg, str(node["bundle"]))
        return exp, exp.split.train
    if "partition-id" not in node:
        raise ValueError("this SuperNode's node-config names no bundle: start it with --node-config "
                         "\"bundle='/abs/path/<group>.bundle.safetensors'\" (written by `pluralllm bundle`)")
    if cfg.eval_bundles:
        raise ConfigError("run-config 'eval-bundles' is for deployments, where the server holds only the held-out "
                          "groups' bundles; a simulation loads the dataset: leave eval-bundles empty")
    torch.set_num_threads(1)  # simulation: share CPU threads between the virtual nodes
    exp = _experiment(cfg)
    pid, n = int(node["partition-id"]), int(node["num-partitions"])
    return exp, exp.split.train[pid::n]


def _receive(msg: Message, context: Context) -> tuple[RunConfig, Experiment, str, Predictor, str]:
    """What a train or evaluate message needs: the run, the message's group (which this node must
    host) and the global model on the device."""
    cfg = RunConfig.from_mapping(context.run_config)
    exp, hosted = _setup(cfg, context)
    group = str(msg.content["config"]["group"])
    if group not in hosted:
        raise ValueError(f"this node hosts {hosted}, not {group!r}")
    device = resolve_device(cfg.device)
    model, rng_after_build = _model(exp.model_config, cfg.seed)
    torch.set_rng_state(rng_after_build)
    model.load_state_dict(to_state_dict(msg.content["arrays"]))
    return cfg, exp, group, model.to(device), device


@functools.lru_cache(maxsize=2)
def _model(config: ModelConfig, seed: int) -> tuple[Predictor, torch.Tensor]:
    """The predictor, built once per process (a Ray actor serves many messages), with the CPU random
    state that building it (`Experiment.build_model`) left behind: every message loads the global
    weights into it and restores that state, so it trains exactly as on a freshly built model."""
    model = build_predictor(config, seed=seed)
    return model, torch.get_rng_state()


def _log_stages(context: Context, kind: str, group: str, entered: float, set_up: float, done: float) -> None:
    """On a deployed node, where every message is a new process, one log line per message: the
    seconds from the process's start to the message (interpreter, imports, Flower's set-up), of
    set-up (bundle, model) and of the work itself. benchmarks/bench_deployment.py reads them."""
    if "bundle" in context.node_config:
        process = psutil.Process()
        print(f"[pluralllm] {kind} {group!r} (pid {process.pid}): {entered - process.create_time():.3f} s from process "
              f"start, {set_up - entered:.3f} s set-up, {done - set_up:.3f} s {kind}", flush=True)


@app.query(HOSTS_QUERY)
def hosted_groups(msg: Message, context: Context) -> Message:
    _, hosted = _setup(RunConfig.from_mapping(context.run_config), context)
    return Message(RecordDict({"hosted": ConfigRecord({"groups": hosted})}), reply_to=msg)


@app.query(PREDICTIONS_QUERY)
def group_predictions(msg: Message, context: Context) -> Message:
    """A group's predictions for a federated reward request: its context answers stay on this node."""
    exp, hosted = _setup(RunConfig.from_mapping(context.run_config), context)
    group = str(msg.content["config"]["group"])
    if group not in hosted:
        raise ValueError(f"this node hosts {hosted}, not {group!r}")
    return Message(answer_query(exp, group, msg.content), reply_to=msg)


def clip_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's `fixedclipping_mod` for rounds whose config carries a clipping norm (run-config
    dp="client"); other runs pass straight through."""
    if KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[clip_when_asked])
def train(msg: Message, context: Context) -> Message:
    entered = time.time()
    cfg, exp, group, model, device = _receive(msg, context)
    set_up = time.time()
    config = msg.content["config"]
    mu = float(config.get("proximal-mu", 0.0))  # present under FedProx only
    anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
    optimizer = ClientOptimizer(model.parameters(), cfg.client_optimizer, float(config["lr"]))
    vectors = exp.vectors(group, "train")
    steps = int(config["local-steps"])
    server_round = int(config["server-round"])
    rng = seeded_rng(cfg.seed, "train", group, server_round)
    shared = seeded_rng(cfg.seed, "questions", server_round) if cfg.episode_sampler == "same-questions" else None
    names = [name for name, _ in model.named_parameters()]
    correction = gradients = None
    if CORRECTION in msg.content:  # SCAFFOLD
        record = to_state_dict(msg.content[CORRECTION])
        correction = [record[name].to(device) for name in names]
        gradients = [torch.zeros_like(p) for p in model.parameters()]
    losses = train_steps(model, optimizer, [vectors], steps, exp.sizes, rng, device, proximal_mu=mu, anchor=anchor,
                         same_questions=shared, episodes_per_step=cfg.episodes_per_step,
                         drift_correction=correction, gradient_sum=gradients)
    metrics = MetricRecord({"train-loss": float(np.mean(losses)), "num-examples": vectors.num_questions,
                            UNIT_WEIGHT: 1, "local-steps": steps})
    _log_stages(context, "train", group, entered, set_up, time.time())
    content = RecordDict({"arrays": to_record(model.state_dict()), "metrics": metrics})
    if gradients is not None:  # this group's new control variate: its mean gradient over the round
        content[CONTROL] = to_record({name: g / max(steps, 1) for name, g in zip(names, gradients)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The group's alignment on its own held-back questions, with context from its training part."""
    entered = time.time()
    cfg, exp, group, model, device = _receive(msg, context)
    set_up = time.time()
    train_part, heldback = exp.vectors(group, "train"), exp.vectors(group, "heldback")
    rng = seeded_rng(cfg.seed, "client-eval", group)
    context_ids = rng.choice(train_part.num_questions, size=min(cfg.eval_context, train_part.num_questions), replace=False)
    predictions = predict(model, train_part.subset(context_ids), heldback, device)
    truths = np.split(heldback.y, heldback.offsets[1:-1])
    score, nan_excluded = mean_excluding_nan(alignment(p, t) for p, t in zip(predictions, truths))
    metrics = MetricRecord({"heldback-alignment": score, "nan-excluded": nan_excluded,
                            "num-examples": heldback.num_questions, UNIT_WEIGHT: 1})
    _log_stages(context, "evaluate", group, entered, set_up, time.time())
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
