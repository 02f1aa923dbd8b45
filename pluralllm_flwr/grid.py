"""Grid wrappers the ServerApp puts around Flower's Grid.

- `PromptGrid` collects replies as they arrive. In a deployment the ServerApp gets flwr 1.42's
  `HttpGrid`, whose `send_and_receive` sleeps 3 s between pulls of replies, so every message type
  of every round waits 0–3 s after its last reply. `PromptGrid` keeps Flower's semantics (push,
  then pull until every reply is in or `timeout` has passed) but pulls every `interval` seconds:
  0.25 s for a deployment, as Flower's own agent grid does (each pull is a request to the
  SuperLink), and 0.02 s in simulation, whose `InMemoryGrid` pulls every 0.1 s by a lookup in its own
  process (`prompt_grid`; the README's simulation figures say what it saved).
- `RunGrid` stamps every message with the config of the run it belongs to, so that one Flower run
  can execute several runs in turn (run-config `batch`) and each ClientApp message knows its own.
- `AuditGrid` records what every message it sends and receives carries, record by record (the
  federated rewards' message audit, reward_queries.py).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

REMOTE_PULL_INTERVAL = 0.25  # seconds between pulls from a SuperLink (a deployment's HttpGrid)
LOCAL_PULL_INTERVAL = 0.02   # seconds between pulls from a simulation's in-process LinkState
RUN_CONFIG = "run-config"  # the ConfigRecord of a message that holds its run's run-config mapping


class GridWrapper(Grid):
    """Everything is the wrapped grid's; subclasses change one thing."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):  # NodeInfo: Flower's protobuf
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class PromptGrid(GridWrapper):
    def __init__(self, grid: Grid, interval: float = REMOTE_PULL_INTERVAL) -> None:
        if not interval > 0:
            raise ValueError(f"pull interval must be > 0 seconds, got {interval}")
        super().__init__(grid)
        self.interval = interval

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            pulled = list(self.pull_messages(pending))
            replies += pulled
            pending -= {m.metadata.reply_to_message_id for m in pulled}
            remaining = math.inf if deadline is None else deadline - time.monotonic()
            if not pending or remaining <= 0:
                break
            time.sleep(min(self.interval, remaining))
        return replies


def prompt_grid(grid: Grid) -> PromptGrid:
    """`grid` pulling replies at the interval that suits it: a simulation's InMemoryGrid reads its own
    process's LinkState, so a short interval costs nothing; anything else asks a SuperLink."""
    from flwr.superlink.grid import InMemoryGrid  # here, not at the top: 0.75 s of imports (SQLAlchemy,
    # FastAPI) that the ClientApp, which imports this module for RUN_CONFIG, must not pay per message
    local = isinstance(grid, InMemoryGrid)
    return PromptGrid(grid, LOCAL_PULL_INTERVAL if local else REMOTE_PULL_INTERVAL)


class RunGrid(GridWrapper):
    """Adds the run's run-config as the `run-config` ConfigRecord of every message it pushes."""

    def __init__(self, grid: Grid, run_config: dict) -> None:
        super().__init__(grid)
        self.record = ConfigRecord(run_config)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(self._stamped(messages))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(self._stamped(messages), timeout=timeout)

    def _stamped(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for message in messages:
            message.content[RUN_CONFIG] = self.record
        return messages


class AuditGrid(GridWrapper):
    """Keeps in `log` an `audit` of every message sent and every reply received through
    `send_and_receive`, the only way its users exchange messages."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.log: list[dict] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.log += [audit("to node", m.metadata.dst_node_id, m) for m in messages]
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.log += [audit("from node", m.metadata.src_node_id, m) for m in replies]
        return replies


def audit(direction: str, node: int, message: Message) -> dict:
    """What one message carried: its type and, record by record, each array's name and shape, each
    config's or metric's keys (or the error a failed reply holds instead)."""
    entry = {"direction": direction, "node": node, "type": message.metadata.message_type}
    if message.has_error():
        return {**entry, "error": message.error.reason}
    return {**entry, "records": {name: {"arrays": {k: list(a.shape) for k, a in record.items()}}
                                 if isinstance(record, ArrayRecord) else {"keys": sorted(record)}
                                 for name, record in message.content.items()}}
