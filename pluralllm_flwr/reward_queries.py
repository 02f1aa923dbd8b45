"""Group rewards computed where the group's answers are (`pluralllm align --federated`).

GRPO needs, for each group aligned to, the predictor's prediction p_g on the alignment questions from
the group's context answers (`reward.GroupReward`). Computed centrally, the aligner reads those answers.
Federated, it never does: a Flower run whose run-config names a `reward-request` file does not train;
its ServerApp sends the checkpoint's weights and the questions' text to the node that hosts each group,
the node draws the group's context from its own data (`group_context`, the draw the central path makes)
and predicts with `reward.GroupRewardModel` (the same code), and the reply carries the predicted
probabilities alone. The ServerApp writes them to the request's reply file with an audit of every
message, the host query's included: what crossed the network, record by record (`grid.AuditGrid`).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from .data import Question, seeded_rng
from .experiment import Experiment
from .grid import AuditGrid
from .results import load_checkpoint
from .reward import GroupContext, GroupRewardModel, RewardModelError
from .strategies import hosted_groups

PREDICTIONS_QUERY = "group_predictions"  # the QUERY action a node answers with a group's predictions


def group_context(exp: Experiment, group: str, size: int, seed: int) -> GroupContext:
    """`size` seeded questions of the group's seen ones (never the run's unseen questions) with its
    answers: what the reward model is given about the group."""
    seen = exp.question_ids(group, "seen")
    picked = sorted(seeded_rng(seed, "align-context", group).choice(len(seen), min(size, len(seen)), replace=False))
    return GroupContext(group, [(exp.data.questions[seen[i]], exp.data.answers[group][seen[i]]) for i in picked])


@dataclass(frozen=True)
class RewardRequest:
    """What the aligner asks the federation: each group's predictions on `questions` from `context` of
    its own answers drawn with `seed`, by the checkpoint's predictor; the ServerApp writes `reply`."""

    checkpoint: str
    groups: list[str]
    context: int
    seed: int
    questions: list[Question]
    reply: str

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**asdict(self), "questions": [asdict(q) for q in self.questions]}))
        return path

    @classmethod
    def read(cls, path: str | Path) -> "RewardRequest":
        try:
            raw = json.loads(Path(path).read_text())
            questions = [Question(q["key"], q["text"], tuple(q["options"]),
                                  None if q.get("ordinal") is None else tuple(q["ordinal"])) for q in raw["questions"]]
            request = cls(str(raw["checkpoint"]), [str(g) for g in raw["groups"]], int(raw["context"]),
                          int(raw["seed"]), questions, str(raw["reply"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RewardModelError(f"run-config 'reward-request' {path}: not a reward request ({exc!r})") from None
        if not request.groups or not request.questions or request.context < 1:
            raise RewardModelError(f"run-config 'reward-request' {path}: needs groups, questions and context >= 1")
        return request


# ----------------------------------------------------------------------------- the node's side


def answer_query(exp: Experiment, group: str, content: RecordDict) -> RecordDict:
    """A node's reply to a PREDICTIONS_QUERY for `group`, which it hosts: the group's predicted
    distribution on each question, concatenated, and nothing else."""
    config = content["config"]
    questions = [Question(k, t, tuple(o)) for k, t, o in json.loads(str(config["questions"]))]
    model = GroupRewardModel.from_state(content["arrays"].to_torch_state_dict(), json.loads(str(config["checkpoint"])),
                                        where="the checkpoint of the reward request", cache_dir=exp.cfg.cache_dir or None,
                                        device=exp.cfg.device)
    context = group_context(exp, group, int(config["context"]), int(config["seed"]))
    predicted = model.predict(context, questions)
    return RecordDict({"predictions": ArrayRecord({"probabilities": Array(np.concatenate(predicted))}),
                       "for": ConfigRecord({"group": group})})


# ----------------------------------------------------------------------------- the ServerApp's side


def query_content(request: RewardRequest, group: str, state: dict, metadata: dict) -> RecordDict:
    """What the node of `group` is sent: the predictor's weights and metadata, the questions' text and
    options, and how to draw the group's context. No answers."""
    return RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({
        "group": group, "checkpoint": json.dumps(metadata), "context": request.context, "seed": request.seed,
        "questions": json.dumps([[q.key, q.text, list(q.options)] for q in request.questions])})})


def serve_reward_request(grid: Grid, path: str | Path, wait: float) -> dict:
    """Ask the node of each requested group for its predictions, waiting up to `wait` seconds for the
    nodes to connect and for their replies; writes and returns {"predictions": group -> one list per
    question, "audit": every message sent and received (`grid.audit`)}."""
    request = RewardRequest.read(path)
    state, metadata = load_checkpoint(request.checkpoint)
    grid = AuditGrid(grid)
    hosts = _find_hosts(grid, request.groups, wait)
    queries = [Message(query_content(request, g, state, metadata), dst_node_id=hosts[g],
                       message_type=f"{MessageType.QUERY}.{PREDICTIONS_QUERY}") for g in request.groups]
    predictions, errors = {}, {}
    for reply in grid.send_and_receive(queries, timeout=wait):
        if reply.has_error():
            errors[reply.metadata.src_node_id] = reply.error.reason
            continue
        flat = reply.content["predictions"]["probabilities"].numpy()
        predictions[str(reply.content["for"]["group"])] = np.split(
            flat, np.cumsum([len(q.options) for q in request.questions])[:-1])
    missing = [g for g in request.groups if g not in predictions]
    if missing:
        raise RewardModelError(f"no predictions for {missing} within {wait:.0f} s; node errors: {errors or 'none'}")
    out = {"predictions": {g: [p.tolist() for p in predictions[g]] for g in request.groups}, "audit": grid.log}
    Path(request.reply).write_text(json.dumps(out))
    return out


def _find_hosts(grid: Grid, groups: list[str], wait: float) -> dict[str, int]:
    """group -> the node hosting it, once every group has one (or an error after `wait` seconds)."""
    deadline, hosts = time.monotonic() + wait, {}
    while True:
        answered, failed = hosted_groups(grid, sorted(set(grid.get_node_ids()) - set(hosts.values())), timeout=wait)
        for node, hosted in answered.items():
            hosts.update({g: node for g in hosted if g in groups})
        missing = [g for g in groups if g not in hosts]
        if not missing:
            return hosts
        if time.monotonic() > deadline:
            raise RewardModelError(f"no node hosts {missing} after {wait:.0f} s; in simulation the nodes host the "
                                   "run's training groups, in a deployment each node the group of its bundle; nodes "
                                   f"that could not say what they host: {failed or 'none'}")
        time.sleep(1.0)
