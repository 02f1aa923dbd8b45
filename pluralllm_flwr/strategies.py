"""Flower strategies with PluralLLM's server side: one client per group, held-out evaluation,
results and checkpoints.

`PluralMixin` goes in front of any Flower strategy (FedAvg, FedProx, ...): the base strategy
decides the content of each round (arrays, config, aggregation rule); the mixin decides the
addressing — one message per training group, sent to the SuperNode that hosts that group — and
records what happened. A SuperNode says which groups it hosts when first asked (a QUERY message),
so the same code serves simulation (a node may host several groups) and real deployments (one node
per group, nodes may leave and come back).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import GaussianPrivacyEvent, Grid, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.strategy import (DifferentialPrivacyClientSideFixedClipping,
                                     DifferentialPrivacyServerSideFixedClipping, FedAdagrad, FedAdam, FedAvg, FedAvgM,
                                     FedMedian, FedProx, FedYogi, QFedAvg, Strategy)
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant  # flwr's RDP accountant (dp-accounting)

from .arrays import to_numpy, to_record, to_state_dict, weighted_mean
from .config import ADAPTIVE_STRATEGIES, RunConfig
from .data import seeded_rng
from .experiment import Experiment, fmt_gain
from .results import ResultsWriter
from .training import lr_factor

log = logging.getLogger(__name__)

CORRECTION = "correction"       # SCAFFOLD: the record of c − c_i the server sends a group's client
CONTROL = "control"             # SCAFFOLD: the record of c_i (the client's mean gradient) it sends back
HOSTS_QUERY = "hosted_groups"   # the QUERY action a SuperNode answers with the groups it hosts
UNIT_WEIGHT = "unit-weight"     # metric every client sends as 1: the weight key of uniform averaging


class NoClientsError(RuntimeError):
    """A round in which no client succeeded: the run stops with the clients' error messages."""


def hosted_groups(grid: Grid, nodes: list[int], timeout: float) -> tuple[dict[int, list[str]], dict[int, str]]:
    """Ask `nodes` which groups they host (HOSTS_QUERY): ({node: its groups}, {node: why it could not say})."""
    query = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                     message_type=f"{MessageType.QUERY}.{HOSTS_QUERY}") for n in nodes]
    answered, failed = {}, {}
    for reply in grid.send_and_receive(query, timeout=timeout) if query else []:
        node = reply.metadata.src_node_id
        if reply.has_error():
            failed[node] = reply.error.reason
        else:
            answered[node] = [str(g) for g in reply.content["hosted"]["groups"]]
    return answered, failed


class PluralMixin:
    """Per-group addressing, periodic held-out evaluation and results, on top of a Flower strategy."""

    def setup(self, cfg: RunConfig, exp: Experiment, writer: ResultsWriter, device: str,
              seconds_per_query: float = 30.0, resumed_from: int = 0) -> None:
        """`resumed_from`: the round of the checkpoint a resumed run starts from (Flower counts its
        rounds from 1 again; every round number here is the run's own)."""
        self.cfg, self.exp, self.writer, self.device = cfg, exp, writer, device
        self.round_offset = resumed_from
        last = writer.history[-1] if resumed_from else {}
        self.fewer_before = list(last.get("rounds_with_fewer_clients", []))
        self.model = exp.build_model().to(device)
        self.query_timeout = seconds_per_query
        self.hosts: dict[str, int] = {}       # group -> node id hosting it
        self.asked: set[int] = set()          # nodes already asked which groups they host
        self.broken: set[int] = set()         # connected nodes that could not say (e.g. a damaged bundle)
        self.gradient_steps = last.get("gradient_steps", 0)
        self.accountant = privacy_accountant(cfg, len(exp.split.train))
        if self.accountant is not None and last.get("dp_releases"):
            self.accountant.compose(self._privacy_event(len(exp.split.train)), count=last["dp_releases"])
        self.rounds: dict[int, dict] = {}     # server round -> {"clients", "failures", "missing", "train_loss"}
        self.client_eval: dict[int, float] = {}
        self.sent: list[tuple[Message, str]] = []  # this round's messages and the group of each
        self.started = time.perf_counter()

    # ----------------------------------------------------------------- addressing
    def discover_hosts(self, grid: Grid, wait: float) -> None:
        """Ask nodes not asked before which groups they host; wait up to `wait` seconds until
        enough training groups have a host (all of them unless min-train-nodes says fewer)."""
        needed = self.cfg.min_train_nodes or len(self.exp.split.train)
        deadline = time.monotonic() + wait
        while True:
            nodes = set(grid.get_node_ids())
            self.hosts = {g: n for g, n in self.hosts.items() if n in nodes}  # forget departed nodes, and ask
            self.asked &= nodes  # again one that returns with its old id (SuperNode authentication keeps it)
            self.broken &= nodes
            new = sorted(nodes - self.asked)
            if new:
                self._ask(grid, new)
            hosted = [g for g in self.exp.split.train if g in self.hosts]
            if len(hosted) >= needed:
                return
            if time.monotonic() > deadline:
                missing = [g for g in self.exp.split.train if g not in self.hosts]
                raise NoClientsError(
                    f"only {len(hosted)} of the {needed} required training groups have a SuperNode after "
                    f"{wait:.0f} s ({len(nodes)} node(s) connected); no node hosts {missing}. In simulation every "
                    "node hosts its share of the groups, so check the nodes' errors above; in a deployment start "
                    "the missing SuperNodes or lower run-config 'min-train-nodes'")
            time.sleep(1.0)

    def _ask(self, grid: Grid, nodes: list[int]) -> None:
        answered, failed = hosted_groups(grid, nodes, self.query_timeout)
        for node, reason in failed.items():
            log.warning("node %s could not say which groups it hosts: %s", node, reason)
            self.broken.add(node)  # a client that failed, in every round it stays so
        for node, groups in answered.items():
            self.broken.discard(node)
            self.asked.add(node)
            for group in groups:
                if group not in self.exp.split.train:
                    log.warning("node %s hosts %r, which is not a training group of this run; ignored", node, group)
                elif self.hosts.get(group, node) != node:
                    log.warning("group %r is hosted by nodes %s and %s; using %s", group, self.hosts[group], node, node)
                    self.hosts[group] = node
                else:
                    self.hosts[group] = node

    def _per_group(self, messages: Iterable[Message], server_round: int, grid: Grid, fraction: float) -> list[Message]:
        """Re-address the base strategy's round content: one message per sampled training group."""
        messages = list(messages)
        if not messages:
            return []
        hosted = [g for g in self.exp.split.train if g in self.hosts]
        n = max(1, math.ceil(fraction * len(hosted)))
        rng = seeded_rng(self.cfg.seed, "sample", server_round)
        groups = sorted(rng.choice(hosted, size=n, replace=False).tolist(), key=hosted.index) if n < len(hosted) else hosted
        content = messages[0].content
        out = []
        for group in groups:
            config = ConfigRecord({**content["config"], "group": group, "server-round": server_round})
            records = {k: v for k, v in content.items() if k != "config"}
            out.append(Message(RecordDict({**records, "config": config}), dst_node_id=self.hosts[group],
                               message_type=messages[0].metadata.message_type))
        self.rounds.setdefault(server_round, {})["missing"] = [g for g in self.exp.split.train if g not in self.hosts]
        self.sent = list(zip(out, groups))  # Flower sets each message's id when it pushes it
        return out

    def _by_group(self, replies: list[Message]) -> list[tuple[str | None, Message]]:
        """Replies with their group, in training-group order: the aggregate then sums in the same
        order whatever order the replies arrived in, so a seed gives the same numbers every time."""
        group_of = {m.metadata.message_id: g for m, g in self.sent}
        order = {g: i for i, g in enumerate(self.exp.split.train)}
        pairs = [(group_of.get(r.metadata.reply_to_message_id), r) for r in replies]
        return sorted(pairs, key=lambda p: (order.get(p[0], len(order)), p[1].metadata.src_node_id))

    # Flower passes its own round numbers (1.. again after a resume); the methods below use the run's.
    # Hosts are found first, within round-timeout: Flower's own sampling would wait forever for nodes.
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.discover_hosts(grid, wait=self.cfg.round_timeout)
        run_round = server_round + self.round_offset
        c = self.cfg
        factor = lr_factor(run_round - 1, c.num_server_rounds, c.lr_schedule, c.warmup_steps)
        config["lr"] = c.lr * factor
        if isinstance(self, FedOpt):  # an adaptive server step is normalised, so it does not shrink with the
            self.eta = c.server_lr * factor  # clients' lr: the schedule scales it too
        if isinstance(self, QFedAvg):  # q-FFL's Lipschitz estimate is 1 / the round's client lr
            self.client_learning_rate = config["lr"]
        messages = super().configure_train(server_round, arrays, config, grid)
        return self._per_group(messages, run_round, grid, self.cfg.fraction_train)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        run_round = server_round + self.round_offset
        if not self.is_eval_round(run_round) or self.cfg.heldback_fraction == 0:
            return []
        self.discover_hosts(grid, wait=self.cfg.round_timeout)
        return self._per_group(super().configure_evaluate(server_round, arrays, config, grid), run_round, grid, 1.0)

    # ----------------------------------------------------------------- aggregation
    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        run_round = server_round + self.round_offset
        pairs = self._by_group(list(replies))
        ok = [r for _, r in pairs if not r.has_error()]
        replies = [r for _, r in pairs]
        info = self.rounds.setdefault(run_round, {})
        info.update(clients=len(ok), failures=len(replies) - len(ok) + len(self.broken),
                    failed_groups=[g for g, r in pairs if r.has_error() and g is not None])
        if not ok:
            reasons = sorted({r.error.reason.strip().splitlines()[-1] for r in replies if r.has_error()})
            raise NoClientsError(f"round {run_round}: no client succeeded ({len(replies)} replies); "
                                 f"errors: {reasons or ['no reply within round-timeout']}")
        self.gradient_steps += sum(int(r.content["metrics"]["local-steps"]) for r in ok)
        arrays, metrics = super().aggregate_train(server_round, ok)
        if metrics is not None:
            info["train_loss"] = float(metrics["train-loss"])
        if arrays is not None and self.accountant is not None:  # the DP wrapper adds noise to these arrays
            self.accountant.compose(self._privacy_event(len(ok)))
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        metrics = super().aggregate_evaluate(server_round, [r for _, r in self._by_group(list(replies))])
        if metrics is not None:
            self.client_eval[server_round + self.round_offset] = float(metrics["heldback-alignment"])
        return metrics

    def _privacy_event(self, clients: int) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(self.cfg.dp_noise, clients, len(self.exp.split.train))

    # ----------------------------------------------------------------- held-out evaluation
    def is_eval_round(self, server_round: int) -> bool:
        return server_round % self.cfg.eval_every == 0 or server_round in (0, self.cfg.num_server_rounds)

    def evaluate_heldout(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """`evaluate_fn` of Strategy.start: the global model on the held-out groups, every
        eval-every rounds, at round 0 and at the last round; recorded in results.json."""
        if server_round == 0 and self.round_offset:
            return None  # a resumed run's starting point was evaluated before it stopped
        server_round += self.round_offset
        if not self.is_eval_round(server_round):
            return None
        self.model.load_state_dict(to_state_dict(arrays))
        info = self.rounds.get(server_round, {})
        n_train = len(self.exp.split.train)
        entry = {"round": server_round, "gradient_steps": self.gradient_steps,
                 "episodes": self.gradient_steps * self.cfg.episodes_per_step,
                 "train_loss": info.get("train_loss"), "clients": info.get("clients", 0 if server_round == 0 else None),
                 "clients_expected": n_train, "client_failures": info.get("failures", 0),
                 "heldback_alignment": self.client_eval.get(server_round),
                 **self.exp.evaluate(self.model, self.device)}
        expected = math.ceil(self.cfg.fraction_train * n_train)
        entry["rounds_with_fewer_clients"] = self.fewer_before + sorted(
            r for r, i in self.rounds.items() if r <= server_round and i.get("clients", n_train) < expected)
        if self.accountant is not None:
            spent = self.accountant.get_privacy_spent()
            entry.update(epsilon=spent.epsilon, dp_delta=spent.delta, dp_releases=spent.num_releases)
        self.writer.record(entry, self.model.state_dict())
        fair = entry["fairness"]
        privacy = f" | epsilon {entry['epsilon']:.2f}" if "epsilon" in entry else ""
        print(f"[round {server_round:>4}] held-out alignment {entry['alignment']:.4f} | gain {fmt_gain(entry)} "
              f"| jain {fair['jain']:.4f} | worst {fair['worst']:.4f} ({fair['worst_group']}) | loss "
              f"{'-' if entry['train_loss'] is None else format(entry['train_loss'], '.4f')}{privacy} | "
              f"{time.perf_counter() - self.started:.0f}s", flush=True)
        return MetricRecord({"alignment": entry["alignment"], "jain": fair["jain"], "worst": fair["worst"]})


class FastMean(FedAvg):
    """FedAvg's weighted mean of the replies' arrays, decoded in place (`arrays.weighted_mean`: the same
    bytes as Flower's `aggregate_arrayrecords`, without parsing every array's .npy header). Listed after
    a Flower strategy built on FedAvg (`class S(PluralMixin, FedAdam, FastMean)`), it comes just before
    FedAvg in the MRO, so that strategy's own aggregation (FedAdam's server step, FedProx, ...) runs on
    top of it unchanged."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        return weighted_mean(contents, self.weighted_by_key), self.train_metrics_aggr_fn(contents, self.weighted_by_key)


class PluralFedAvg(PluralMixin, FastMean):
    """FedAvg: weighted by each group's number of training questions, or uniformly."""


class PluralFedProx(PluralMixin, FedProx, FastMean):
    """FedProx: the server sends proximal-mu; clients add (mu/2)·‖w − w_global‖² to their loss."""


class PluralFedMedian(PluralMixin, FedMedian):
    """Coordinate-wise median of the group models (robust to a few outlying groups)."""


class PluralFedAvgM(PluralMixin, FedAvgM, FastMean):
    """FedAvg with server momentum (Hsu et al. 2019): the averaged update is the pseudo-gradient of
    server SGD with step server-lr and momentum server-momentum."""


class PluralFedAdam(PluralMixin, FedAdam, FastMean):
    """Adam on the server (Reddi et al. 2021): the averaged update is the pseudo-gradient of Adam with
    step server-lr (Flower's beta_1 0.9 and beta_2 0.99; tau is server-tau). Its per-weight normalisation keeps
    the small update the groups agree on from vanishing under the parts they disagree on."""


class PluralFedYogi(PluralMixin, FedYogi, FastMean):
    """Yogi on the server (Reddi et al. 2021): Adam with a sign-controlled second moment."""


class PluralFedAdagrad(PluralMixin, FedAdagrad, FastMean):
    """Adagrad on the server (Reddi et al. 2021)."""


class PluralScaffold(PluralMixin, FastMean):
    """SCAFFOLD (Karimireddy et al. 2020): each client adds c − c_i to every local gradient, where c_i is
    its group's mean gradient of the last round it trained and c their weighted mean, so a group's
    local steps follow the federation's gradient instead of drifting to its own optimum (which on
    non-IID groups averages their differences away). The server keeps every c_i and sends each client
    its own correction, so clients hold no state between rounds."""

    def setup(self, *args, **kwargs) -> None:
        super().setup(*args, **kwargs)
        self.controls: dict[str, tuple[float, dict[str, np.ndarray]]] = {}  # group -> (weight, c_i)
        self.control = {name: np.zeros(p.shape, np.float32) for name, p in self.model.named_parameters()}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        messages = super().configure_train(server_round, arrays, config, grid)
        for message, group in self.sent:
            own = self.controls.get(group, (0.0, {}))[1]
            message.content[CORRECTION] = to_record({name: c - own[name] if own else c
                                                     for name, c in self.control.items()})
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        for group, reply in self._by_group(replies):
            if group is not None and not reply.has_error() and CONTROL in reply.content:
                control = reply.content.pop(CONTROL)  # FedAvg expects one ArrayRecord per reply
                weight = float(reply.content["metrics"][self.weighted_by_key])
                self.controls[group] = (weight, {k: to_numpy(v) for k, v in control.items()})
        if self.controls:
            total = sum(w for w, _ in self.controls.values())
            self.control = {name: sum(w * c[name] for w, c in self.controls.values()) / total for name in self.control}
        return super().aggregate_train(server_round, replies)


class PluralQFedAvg(PluralMixin, QFedAvg):
    """q-FedAvg (q-FFL, Li et al. 2020), Flower's: each group's update is weighted by its training loss to
    the power qfedavg-q, so the groups the model serves worst pull hardest (q = 0: the uniform mean; it
    ignores `weighting`). The loss is the mean over the client's local steps, the first taken at the global
    weights; L = 1 / the round's client lr, as for clients taking SGD steps."""


STRATEGIES = {"fedavg": PluralFedAvg, "fedprox": PluralFedProx, "fedmedian": PluralFedMedian,
              "fedavgm": PluralFedAvgM, "fedadam": PluralFedAdam, "fedyogi": PluralFedYogi,
              "fedadagrad": PluralFedAdagrad, "scaffold": PluralScaffold, "qfedavg": PluralQFedAvg}


def build_strategy(cfg: RunConfig) -> PluralMixin:
    """The strategy named by run-config 'strategy', with the weighting of run-config 'weighting'."""
    kwargs = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                  min_available_nodes=1,
                  weighted_by_key="num-examples" if cfg.weighting == "num-examples" else UNIT_WEIGHT)
    if cfg.strategy == "fedprox":
        kwargs["proximal_mu"] = cfg.proximal_mu
    elif cfg.strategy == "fedavgm":
        kwargs.update(server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum)
    elif cfg.strategy in ADAPTIVE_STRATEGIES:
        kwargs.update(eta=cfg.server_lr, eta_l=cfg.lr, tau=cfg.server_tau)
    elif cfg.strategy == "qfedavg":
        kwargs.update(client_learning_rate=cfg.lr, q=cfg.qfedavg_q, train_loss_key="train-loss")
    return STRATEGIES[cfg.strategy](**kwargs)


def with_privacy(cfg: RunConfig, strategy: PluralMixin, num_clients: int) -> Strategy:
    """Flower's central-DP wrapper for run-config `dp` (or the strategy itself for "none"): each
    client's update is clipped to dp-clip (on the client by `fixedclipping_mod`, or on the server),
    and Gaussian noise of std dp-noise·dp-clip/clients is added to the average."""
    if cfg.dp == "none":
        return strategy
    wrapper = (DifferentialPrivacyClientSideFixedClipping if cfg.dp == "client"
               else DifferentialPrivacyServerSideFixedClipping)
    return wrapper(strategy, noise_multiplier=cfg.dp_noise, clipping_norm=cfg.dp_clip, num_sampled_clients=num_clients)


def privacy_accountant(cfg: RunConfig, num_clients: int) -> RdpAccountant | None:
    """Rényi-DP accounting of the rounds' Gaussian releases (every client takes part each round, so
    no sampling amplification is claimed); epsilon is reported at dp-delta."""
    if cfg.dp == "none":
        return None
    return RdpAccountant(PrivacyConfig(target_delta=cfg.dp_delta, population_size=num_clients,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION))
