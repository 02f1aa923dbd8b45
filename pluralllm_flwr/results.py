"""The results contract every method writes: `results.json`, `history.csv`, and safetensors
checkpoints of the best and the last model. Reports, benchmarks and the reproduction read only these.

results.json = {"method", "dataset", "embedder", "seed", "config", "train_groups", "eval_groups",
"baselines": {"uniform": {"alignment", "per_group"}, "train_mean": {..., "coverage"}} (train_mean is
{"unavailable": reason} where the server holds no training group's answers, as in a deployment),
"history": [{"round", "gradient_steps", "episodes", "wall_seconds" (from the start of training: a federated
run's wait for its nodes to connect is left out), "train_seconds" (wall time minus the held-out
evaluations, which every method runs alike, and the saving of results and checkpoints after each),
"alignment", "per_group", "fairness": {"jain", "cov", "worst", ...}, "conditioning_gain" (own context minus another held-out group's
answers to the same context questions, or null where that does not apply), "conditioning": {...},
"context_curve": {"1": alignment, "5": ..., ...}, "unseen": {...} (with heldout-questions), ...}],
"best": <entry>, "final": <entry>}; baselines also hold "nearest_group" and "context_mixture"
(see evaluation.py), null with the reason where the training groups' answers are absent.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, RunConfig

RESULTS_FILE, HISTORY_FILE = "results.json", "history.csv"
BEST_CHECKPOINT, LAST_CHECKPOINT = "best.safetensors", "last.safetensors"
TRAINER_STATE = "last.trainer.pt"  # what a centralized run needs besides the weights to resume exactly
RUN_FILES = (RESULTS_FILE, HISTORY_FILE, BEST_CHECKPOINT, LAST_CHECKPOINT, TRAINER_STATE)
# The baselines every run records (evaluation.evaluate_baselines), with their printed names.
BASELINE_NAMES = {"uniform": "uniform", "train_mean": "train-mean", "nearest_group": "nearest group",
                  "context_mixture": "context mixture"}
TIMING_FIELDS = ("wall_seconds", "train_seconds", "eval_seconds")  # the only fields that differ between reruns


class ResultsWriter:
    """Appends evaluation points and rewrites the files after each one, so a run that is stopped
    early still leaves valid results behind."""

    def __init__(self, out_dir: str | Path, method: str, cfg: RunConfig, train_groups: list[str],
                 eval_groups: list[str], baselines: dict, checkpoint_metadata: dict | None = None, *,
                 resumed: bool = False) -> None:
        self.out_dir = Path(out_dir).resolve()
        if not resumed:
            refuse_existing_run(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.not_training_seconds = 0.0  # evaluations, and saving the results and checkpoints after each
        self.checkpoint_metadata = checkpoint_metadata or {}
        self.results = {"method": method, "dataset": cfg.dataset, "embedder": cfg.embedder, "seed": cfg.seed,
                        "config": cfg.to_mapping(), "train_groups": train_groups, "eval_groups": eval_groups,
                        "baselines": baselines, "history": [], "best": None, "final": None}

    @classmethod
    def resume(cls, out_dir: str | Path, cfg: RunConfig, *, method: str | None = None,
               last_round: int | None = None) -> tuple["ResultsWriter", dict[str, torch.Tensor], int]:
        """Continue a stopped run: its results up to the last checkpoint, that checkpoint's weights and
        round. The run's configuration must be the same but for the number of rounds (which may grow
        only under a constant learning rate: a schedule depends on the total); `method`, when given, must
        be the run's; `last_round` is where the run ends (default num-server-rounds)."""
        out = Path(out_dir).resolve()
        try:
            results = load_results(out)
            state, meta = load_checkpoint(out / LAST_CHECKPOINT)
        except (OSError, ValueError) as exc:  # missing, unreadable or corrupt files
            raise ValueError(f"cannot resume from {out}: {exc}") from None
        if method is not None and results["method"] != method:
            raise ValueError(f"cannot resume {out} as {method}: it holds a {results['method']} run")
        ignore = {"num-server-rounds", "resume"}
        before = {k: v for k, v in results["config"].items() if k not in ignore}
        now = {k: v for k, v in cfg.to_mapping().items() if k not in ignore}
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            raise ValueError(f"cannot resume {out}: run-config differs from the stopped run in {changed}")
        rounds_before = results["config"].get("num-server-rounds")
        if cfg.lr_schedule != "constant" and rounds_before != cfg.num_server_rounds:
            raise ValueError(f"cannot resume {out} to {cfg.num_server_rounds} rounds: its {cfg.lr_schedule} learning-rate "
                             f"schedule ran over {rounds_before} rounds; resume with num-server-rounds={rounds_before}, "
                             "or use lr-schedule='constant' for runs that are extended")
        if "round" not in meta:
            raise ValueError(f"cannot resume from {out / LAST_CHECKPOINT}: it records no round")
        round_ = int(meta["round"])
        if round_ >= (cfg.num_server_rounds if last_round is None else last_round):
            raise ValueError(f"{out} already reached round {round_}: the run is finished; raise num-server-rounds "
                             "to continue it")
        history = [e for e in results["history"] if e["round"] <= round_]
        if not history or history[-1]["round"] != round_:
            raise ValueError(f"cannot resume {out}: results.json has no evaluation at the checkpoint's round {round_}")
        writer = cls(out, results["method"], cfg, results["train_groups"], results["eval_groups"], results["baselines"],
                     checkpoint_metadata={k: v for k, v in meta.items() if k not in ("round", "alignment")},
                     resumed=True)
        writer.results.update(history=history, final=history[-1], best=best_entry(history))
        last = history[-1]
        writer.started -= last["wall_seconds"]  # wall time continues
        writer.not_training_seconds = last["wall_seconds"] - last.get("train_seconds", last["wall_seconds"])
        return writer, state, round_

    def not_counted(self, seconds: float) -> None:
        """Leave `seconds` spent before training (a deployment waiting for its SuperNodes) out of the
        wall and training times: round 0 then reports the evaluation only."""
        self.started += seconds

    @property
    def history(self) -> list[dict]:
        return self.results["history"]

    def record(self, entry: dict, state_dict: dict[str, torch.Tensor] | None = None,
               trainer_state: dict | None = None) -> dict:
        """Add one evaluation point ({"round", "gradient_steps", "alignment", ...}); wall_seconds is
        filled in, and train_seconds (the same less the evaluations' own `eval_seconds`, and less the time
        earlier calls spent saving: a run evaluated every round would otherwise count a checkpoint write
        per round as training). Saves the last model, and the best one when this point is the best so
        far; `trainer_state` (optimizer and random-stream states, see `load_trainer_state`) beside the
        last model."""
        now = time.perf_counter()
        wall = now - self.started
        self.not_training_seconds += entry.get("eval_seconds", 0.0)
        entry = {"round": entry["round"], "gradient_steps": entry["gradient_steps"], "wall_seconds": round(wall, 3),
                 "train_seconds": round(wall - self.not_training_seconds, 3), **entry}
        self.history.append(entry)
        best = self.results["best"]
        is_best = best is None or _better(entry["alignment"], best["alignment"])
        if is_best:
            self.results["best"] = entry
        self.results["final"] = entry
        if trainer_state is not None:  # before the checkpoint, which is what a resume starts from
            tmp = self.out_dir / (TRAINER_STATE + ".tmp")
            torch.save({**trainer_state, "round": entry["round"]}, tmp)
            os.replace(tmp, self.out_dir / TRAINER_STATE)
        if state_dict is not None:
            meta = {**self.checkpoint_metadata, "round": entry["round"], "alignment": entry["alignment"]}
            save_checkpoint(self.out_dir / LAST_CHECKPOINT, state_dict, meta)
            if is_best:
                save_checkpoint(self.out_dir / BEST_CHECKPOINT, state_dict, meta)
        self._write()
        self.not_training_seconds += time.perf_counter() - now
        return entry

    def _write(self) -> None:
        _atomic_write(self.out_dir / RESULTS_FILE, json.dumps(self.results, indent=1, default=_jsonable))
        rows = [history_row(e) for e in self.history]
        columns = list(dict.fromkeys(k for row in rows for k in row))
        tmp = self.out_dir / (HISTORY_FILE + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.out_dir / HISTORY_FILE)


def load_trainer_state(out_dir: str | Path, round_: int) -> dict:
    """The trainer state `record` saved with the last checkpoint, which must be that of `round_`."""
    path = Path(out_dir) / TRAINER_STATE
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # missing, or not a file torch wrote
        raise ValueError(f"cannot resume from {path.parent}: no readable {TRAINER_STATE} ({exc})") from None
    if state.get("round") != round_:
        raise ValueError(f"cannot resume from {path.parent}: {TRAINER_STATE} is of round {state.get('round')}, "
                         f"the last checkpoint of round {round_}")
    return state


def holds_run(out_dir: str | Path) -> list[str]:
    """The files of a run (results, history, checkpoints) that `out_dir` holds already."""
    return [name for name in RUN_FILES if (Path(out_dir) / name).exists()]


def refuse_existing_run(out_dir: str | Path) -> None:
    """A fresh run never writes over another one's files."""
    found = holds_run(out_dir)
    if found:
        raise ConfigError(f"out-dir {out_dir} already holds a run ({', '.join(found)}): continue it with run-config "
                          "resume=true, start it again with --overwrite (the old files are kept aside), or choose "
                          "another out-dir")


def claim_run_dir(cfg: RunConfig, out_dir: str | Path, *, overwrite: bool = False, method: str | None = None,
                  last_round: int | None = None) -> Path | None:
    """Before a run starts (and before any Flower process): may it write into `out_dir`? A resume must
    pass `ResultsWriter.resume`'s checks; a fresh run needs a directory holding no run, unless
    `overwrite`, which moves the old one aside to <out-dir>.replaced-<time> (returned)."""
    out = Path(out_dir).resolve()
    if cfg.resume:
        if overwrite:
            raise ConfigError("resume=true continues the run in out-dir; --overwrite starts it again: give one")
        ResultsWriter.resume(out, cfg, method=method, last_round=last_round)
        return None
    if not overwrite or not holds_run(out):
        refuse_existing_run(out)
        return None
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(aside)
    return aside


def history_row(entry: dict) -> dict:
    """One flat CSV row: scalar fields, `fairness_*`, and `group:<name>` per-group scores."""
    row = {k: v for k, v in entry.items() if not isinstance(v, (dict, list))}
    for key, value in entry.items():
        if isinstance(value, dict) and key.endswith("fairness"):
            row.update({f"{key}_{k}": v for k, v in value.items()})
        elif isinstance(value, dict) and key.endswith("per_group"):
            prefix = key[: -len("per_group")]
            row.update({f"{prefix}group:{g}": v for g, v in value.items()})
        elif key == "context_curve":
            row.update({f"context_{size}": v for size, v in value.items()})
        elif key == "unseen":
            row.update({f"unseen_{k}": v for k, v in value.items()})
    return row


def load_results(path: str | Path) -> dict:
    """results.json from a run directory (or the file itself), with a clear error otherwise."""
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no results.json (is {path} a run's output directory?)")
    results = json.loads(file.read_text())
    missing = {"method", "history", "baselines", "eval_groups"} - set(results)
    if missing:
        raise ValueError(f"{file}: not a results file of this project (missing {sorted(missing)})")
    return results


def save_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
    """safetensors weights with JSON metadata (model config, embedder, groups...) so a checkpoint
    describes itself."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"pluralllm": json.dumps(metadata, default=_jsonable)})
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("pluralllm", "{}"))
        return load_file(str(path)), meta
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({exc})") from None


def best_entry(history: list[dict]) -> dict:
    """The first evaluation with the highest alignment (NaN never counts as best), as `record` keeps it."""
    return max(history, key=lambda e: (not math.isnan(e["alignment"]), e["alignment"]))


def _better(a: float, b: float) -> bool:
    return not math.isnan(a) and (math.isnan(b) or a > b)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def out_dir_for(cfg: RunConfig, method: str) -> Path:
    """The run's output directory: run-config out-dir, else runs/<timestamp>-<method>, absolute."""
    if cfg.out_dir:
        return Path(cfg.out_dir).expanduser().resolve()
    return (Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{method}").resolve()
