"""The ServerApp: validate the run-config, prepare data and embeddings, run the strategy; with
run-config `batch`, several runs in turn in one Flower run (one start-up of Flower and Ray); with
run-config `reward-request`, no training: the groups' nodes predict for a federated aligner."""
from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from .config import RunConfig, read_batch
from .experiment import baseline_summary, fmt_gain, prepare_experiment, resolve_device
from .grid import RunGrid, prompt_grid
from .results import ResultsWriter, out_dir_for
from .reward_queries import serve_reward_request
from .strategies import build_strategy, with_privacy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_mapping(context.run_config)  # one clear error before any client starts
    runs = read_batch(cfg.batch) if cfg.batch else [cfg]  # every run of a batch checked before the first
    grid = prompt_grid(grid)  # replies as they arrive, not every 3 s (HttpGrid) or 0.1 s (InMemoryGrid)
    if cfg.reward_request:  # not a training run: the groups' nodes predict for `pluralllm align --federated`
        reply = serve_reward_request(grid, cfg.reward_request, wait=cfg.round_timeout)
        print(f"PluralLLM reward request: predictions of {sorted(reply['predictions'])}", flush=True)
        return
    for i, run in enumerate(runs):
        if len(runs) > 1:
            print(f"PluralLLM batch: run {i + 1} of {len(runs)}", flush=True)
        run_federated(RunGrid(grid, run.to_mapping()), run)


def run_federated(grid: Grid, cfg: RunConfig) -> None:
    """One federated run on `grid`, whose messages carry `cfg` to the ClientApps."""
    exp = prepare_experiment(cfg, progress=False)       # also embeds (cached) so clients find the cache
    out_dir = out_dir_for(cfg, cfg.strategy)
    print(f"PluralLLM {cfg.strategy}: {len(exp.split.train)} training groups, {len(exp.split.eval)} held-out "
          f"groups, {len(exp.data.questions)} questions, model {cfg.model} on {cfg.features} features of "
          f"{cfg.embedder} ({exp.table.dim}-d); "
          f"results in {out_dir}", flush=True)
    if cfg.resume:  # continue from the last checkpoint with the run's own round numbers
        writer, state, start_round = ResultsWriter.resume(out_dir, cfg)
        print(f"resuming from round {start_round} of {out_dir}", flush=True)
    else:
        writer, state, start_round = ResultsWriter(out_dir, cfg.strategy, cfg, exp.split.train, exp.split.eval,
                                                   exp.baselines(), exp.checkpoint_metadata()), None, 0
    base = writer.results["baselines"]
    print(f"baselines on the held-out groups: {baseline_summary(base)}", flush=True)
    strategy = build_strategy(cfg)
    strategy.setup(cfg, exp, writer, resolve_device(cfg.device), resumed_from=start_round)
    if state is not None:
        strategy.model.load_state_dict(state)
    waiting = time.perf_counter()
    strategy.discover_hosts(grid, wait=cfg.round_timeout)
    writer.not_counted(time.perf_counter() - waiting)  # no client trains while the nodes connect
    runner = with_privacy(cfg, strategy, len(exp.split.train))
    runner.start(grid=grid, initial_arrays=ArrayRecord(strategy.model.state_dict()),
                 num_rounds=cfg.num_server_rounds - start_round, timeout=cfg.round_timeout,
                 train_config=ConfigRecord({"lr": cfg.lr, "local-steps": cfg.local_steps}),
                 evaluate_fn=strategy.evaluate_heldout)
    final, best = writer.results["final"], writer.results["best"]
    print(f"done: final alignment {final['alignment']:.4f} (round {final['round']}), conditioning gain "
          f"{fmt_gain(final)}, best {best['alignment']:.4f} (round {best['round']}); results in {out_dir}", flush=True)
