"""The `pluralllm` command: thin wrappers that parse arguments, call the library and print."""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
import traceback

from pathlib import Path

from . import data as D
from .config import (DATASETS, DEMO_FEDERATION, DEMO_ROUNDS, FEDAVG_FEDERATION, ConfigError, RunConfig, group_names,
                     parse_overrides)
from .forkserver import PRELOAD


def _dataset_args(parser: argparse.ArgumentParser, with_json: bool = True) -> None:
    parser.add_argument("--dataset", choices=["globalopinionqa", "opinionqa"], default="globalopinionqa")
    parser.add_argument("--path", default="", help="local data: global_opinions.csv or OpinionQA's human_resp "
                        "folder (GlobalOpinionQA is downloaded from the hub when omitted)")
    if with_json:
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _dataset_config(args: argparse.Namespace, **more) -> RunConfig:
    if args.dataset == "opinionqa" and not args.path:
        raise ConfigError("--dataset opinionqa needs --path: OpinionQA's human_resp folder, e.g. --path /abs/human_resp")
    return RunConfig(dataset=args.dataset, data_path=args.path, **more)


def cmd_data(args: argparse.Namespace) -> int:
    cfg = _dataset_config(args)
    info = D.summary(D.load_dataset(cfg))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['dataset']}: {info['questions']} questions, {info['options']} options, "
          f"{len(info['groups'])} groups")
    width = max(len(g) for g in info["groups"]) if info["groups"] else 5
    print(f"\n{'group':<{width}}  questions")
    for group, n in info["groups"].items():
        print(f"{group:<{width}}  {n:>9}")
    print("\nfiltered or adjusted (count):" if info["dropped"] else "\nnothing filtered")
    for reason, n in info["dropped"].items():
        print(f"  {n:>6}  {reason}")
    return 0


def _run_config(args: argparse.Namespace) -> RunConfig:
    """The pyproject defaults with `--run-config` overrides, parsed as `flwr run` parses them (over a
    command's own `defaults`, as the demo's)."""
    return RunConfig.from_mapping({**getattr(args, "defaults", {}), **parse_overrides(args.run_config)})


def _run_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-config", "-c", action="append", metavar="'KEY=VALUE ...'",
                        help="run-config overrides as for `flwr run`, e.g. \"num-server-rounds=30 dataset='opinionqa' "
                             "data-path='/abs/human_resp'\" (keys: pyproject.toml [tool.flwr.app.config])")


def _overwrite_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="start again in an out-dir that holds a run, "
                        "keeping the old one aside as <out-dir>.replaced-<time> (without it such a run is refused "
                        "unless resume=true)")


def cmd_embed(args: argparse.Namespace) -> int:
    from .embeddings import embed_questions
    from .features import FEATURES, option_features, separation

    cfg = _dataset_config(args, cache_dir=args.cache_dir)
    data = D.load_dataset(cfg)
    table, info = embed_questions(data.questions, args.model, cache_dir=cfg.cache_path, device=args.device,
                                  dtype=args.dtype, batch_size=args.batch_size, max_length=args.max_length)
    info["separation"] = {name: separation(option_features(table, name)) for name in FEATURES}
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['vectors']} vectors of {info['dim']} dimensions from {info['model']} "
          f"({'cache hit' if info['cached'] else 'computed'}, {info['seconds']:.1f} s): {info['cache_file']}")
    print("how well each run-config `features` tells a question's options apart (lower within-question cosine "
          "and a larger within-question share of the variance separate them better):")
    for name, sep in info["separation"].items():
        print(f"  {name:<26} within-question cosine {sep['within_question_cosine']:.3f}, between questions "
              f"{sep['between_question_cosine']:.3f}, within-question share of variance "
              f"{sep['within_question_variance_share']:.1%}")
    return 0


def cmd_centralized(args: argparse.Namespace) -> int:
    from .centralized import train_centralized

    writer = train_centralized(_run_config(args), compute_matched=args.compute_matched, overwrite=args.overwrite)
    _print_outcome(writer.results, writer.out_dir)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from .experiment import prepare_experiment
    from .results import load_results, out_dir_for
    from .simulation import progress_only, simulate

    if args.num_supernodes < 0:
        raise ConfigError(f"--num-supernodes must be at least 1 (or 0: one per training group), got {args.num_supernodes}")
    cfg = _run_config(args)
    cfg = cfg.replace(out_dir=str(out_dir_for(cfg, cfg.strategy)))  # absolute: the ServerApp runs elsewhere
    _claim(cfg, args.overwrite)
    exp = prepare_experiment(cfg)  # validate and embed here, with progress, before Flower starts
    nodes = args.num_supernodes or len(exp.split.train)
    print(f"simulating {len(exp.split.train)} training groups on {nodes} virtual SuperNodes; results in {cfg.out_dir}",
          flush=True)
    simulate(cfg, nodes, timeout=args.timeout, echo=progress_only if args.quiet else print)
    _print_outcome(load_results(cfg.out_dir), Path(cfg.out_dir))
    return 0


def _claim(cfg: RunConfig, overwrite: bool) -> None:
    """Check the out-dir (and a resume) here, in a second, rather than in the ServerApp after Flower started."""
    from .results import claim_run_dir

    aside = claim_run_dir(cfg, cfg.out_dir, overwrite=overwrite, method=cfg.strategy)
    if aside:
        print(f"the earlier run in {cfg.out_dir} is kept in {aside}", flush=True)


def cmd_bundle(args: argparse.Namespace) -> int:
    """Write one file per group with just that group's data, for its SuperNode (or the server)."""
    from .bundle import write_bundles
    from .experiment import prepare_experiment

    cfg = _run_config(args)
    if cfg.eval_bundles:
        raise ConfigError("`pluralllm bundle` reads the dataset: leave run-config eval-bundles empty")
    exp = prepare_experiment(cfg)
    train, held = exp.split.train, exp.split.eval
    groups = train + held if args.all else list(dict.fromkeys(args.group or []))
    if not groups:
        raise ConfigError("name the groups to bundle with --group NAME (repeatable), or --all")
    unknown = [g for g in groups if g not in train + held]
    if unknown:
        raise ConfigError(f"group(s) {unknown} are not in this run; training groups: {train}; held-out: {held}")
    paths = {g: p.resolve() for g, p in write_bundles(exp, groups, args.out_dir).items()}
    for group, path in paths.items():
        role = "training" if group in train else "held-out"
        print(f"{role:<8}  {group}: {path} ({len(exp.data.answers[group])} questions)")
    if any(g in train for g in paths):
        print("\neach training group's SuperNode: flower-supernode ... --node-config \"bundle='<its path>'\"")
    if any(g in held for g in paths):
        print(f"the server's run-config: eval-bundles='{','.join(str(p) for g, p in paths.items() if g in held)}'")
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from .deploy import deploy_local, deployment_defaults
    from .results import load_results, out_dir_for
    from .simulation import progress_only

    if args.groups < 1:
        raise ConfigError(f"--groups must be at least 1, got {args.groups}")
    given = parse_overrides(args.run_config)
    cfg = RunConfig.from_mapping(given)
    defaults = {k: v for k, v in deployment_defaults(args.groups).items() if k.replace("_", "-") not in given}
    cfg = cfg.replace(out_dir=str(out_dir_for(cfg, cfg.strategy)), **defaults)
    _claim(cfg, args.overwrite)
    print(f"deploying {args.groups} SuperNodes and a SuperLink on 127.0.0.1 ({'no TLS' if args.insecure else 'TLS'}); "
          f"results in {cfg.out_dir}", flush=True)
    outcome = deploy_local(cfg, args.groups, insecure=args.insecure, timeout=args.timeout,
                           echo=progress_only if args.quiet else print, warm=not args.cold_clientapps)
    _print_outcome(load_results(cfg.out_dir), Path(cfg.out_dir))
    print(f"logs of every process: {outcome['logs']}")
    return 0


def cmd_deploy_clientapp_server(args: argparse.Namespace) -> int:
    from .forkserver import run

    run(args.directory, [m for m in args.preload.split(",") if m])
    return 0


def cmd_deploy_certs(args: argparse.Namespace) -> int:
    from .deploy import make_certificates

    paths = make_certificates(args.out_dir, args.host, args.days)
    print(f"certificate authority: {paths['ca'].resolve()}  (to every SuperNode: --root-certificates; "
          "to the flwr CLI: root-certificates in its connection)")
    print(f"SuperLink certificate: {paths['cert'].resolve()} and key {paths['key'].resolve()}  (SuperLink only: "
          "--ssl-certfile, --ssl-keyfile, --ssl-ca-certfile <the CA>)")
    print(f"CA private key: {paths['ca_key'].resolve()}  (signs certificates: keep it off the machines)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: embed (cached), simulate the federation, write the report into runs/<timestamp>/."""
    run_dir = (Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    defaults = {**DEMO_FEDERATION, "dataset": args.dataset, "data-path": str(Path(args.path).resolve()) if args.path
                else "", "num-server-rounds": args.rounds, "out-dir": str(run_dir / "federated")}  # -c still wins
    simulation = argparse.Namespace(run_config=args.run_config, defaults=defaults, num_supernodes=0, timeout=None,
                                    quiet=True, overwrite=False)
    out_dir = Path(_run_config(simulation).out_dir).resolve()
    status = cmd_simulate(simulation)
    if status:
        return status
    report_dir = run_dir if out_dir == run_dir / "federated" else out_dir  # -c out-dir=...: the report beside the run
    cmd_report(argparse.Namespace(runs=[str(out_dir)], out=str(report_dir)))
    print(f"\ndemo done: open {report_dir / 'report.md'} (plots beside it).\nAt the paper's scale (1,000 rounds; the "
          "default run-config):  pluralllm simulate -c \"dataset='...' data-path='...'\"")
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    """GRPO of a policy LM toward groups' opinions, the run's predictor as reward (align.py), then its report."""
    from .align import AlignSettings, align, alignment_task, central_predictions, federated_predictions
    from .align_report import write_align_report

    given = {"steps": args.steps, "beta": args.beta, "learning_rate": args.lr, "generations": args.generations,
             "prompts_per_step": args.prompts_per_step, "trainable_layers": args.trainable_layers,
             "eval_every": args.eval_every, "temperature": args.temperature,
             "adapt_every": args.adapt_every, "trainer": args.trainer}  # None: AlignSettings' default
    settings = AlignSettings(aggregate=args.aggregate, seed=args.seed,
                             **{k: v for k, v in given.items() if v is not None})
    groups, measure = group_names(args.groups), group_names(args.measure)
    task = alignment_task(args.run, groups, args.context, args.questions, args.seed, measure_also=measure,
                          read_contexts=not args.federated)
    out = Path(args.out or f"runs/align/{time.strftime('%Y%m%d-%H%M%S')}")
    rewards = "federated" if args.federated else "central"
    print(f"align: {len(task.questions)} unseen questions, groups {groups}, policy {args.policy!r}, {rewards} "
          f"rewards; out {out}")
    if args.federated:
        predicted = federated_predictions(task, args.run, out)
    else:
        predicted = central_predictions(task, args.run, cache_dir=args.cache_dir or None)
    align(task, predicted, args.policy, settings, out, run=args.run, rewards=rewards, cache_dir=args.cache_dir or None)
    print(f"report: {write_align_report(out)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = args.out or args.runs[0]
    print(f"report: {write_report(args.runs, out)}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """The paper's comparison and the ablations (reproduce.py), then the report (reproduction_report.py)."""
    from dataclasses import replace

    from .reproduce import PAPER_PREDICTOR, SCALES, load_manifest, reproduce
    from .reproduction_report import write_reproduction_report

    scale = SCALES[args.scale]
    changes = {"rounds": args.rounds, "seeds": tuple(args.seeds) if args.seeds else None,
               "embedders": tuple(args.embedders) if args.embedders else None}
    scale = replace(scale, **{k: v for k, v in changes.items() if v})
    out = Path(args.out or f"runs/reproduce/{scale.name}")
    command = shlex.join(["pluralllm", *args.argv])
    if args.report_only:
        manifest = load_manifest(out)
    else:
        datasets = dict(_dataset_spec(s) for s in args.dataset or [])
        if not datasets:
            raise ConfigError("name the datasets: --dataset opinionqa=PATH/human_resp and/or --dataset globalopinionqa[=CSV]")
        # The paper's predictor on its raw embeddings, and the default predictor in FedAvg's federation
        # (the stress test); -c applies to both.
        overrides = parse_overrides(args.run_config)
        paper = RunConfig.from_mapping({**PAPER_PREDICTOR, **overrides})
        plural = RunConfig.from_mapping({**FEDAVG_FEDERATION, **overrides})
        manifest = reproduce(datasets, scale, paper, out, echo=lambda line: print(line, flush=True),
                             command=command, plural=plural)
    report = args.report or (out / "results.md" if scale.name == "smoke" else "docs/results.md")
    print(f"report: {write_reproduction_report(manifest, report, command)}")
    return 0


def _dataset_spec(text: str) -> tuple[str, str]:
    name, _, path = text.partition("=")
    if name not in DATASETS:
        raise ConfigError(f"--dataset {text!r}: unknown dataset {name!r}; choose from {list(DATASETS)}")
    return name, path


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def cmd_score(args: argparse.Namespace) -> int:
    from .reward import format_scores, score_command

    result = score_command(args.checkpoint, args.context, args.questions, cache_dir=args.cache_dir or None,
                           device=args.device, progress=not args.json)
    print(json.dumps(result, indent=2) if args.json else format_scores(result))
    return 0


def _print_outcome(results: dict, out_dir: Path) -> None:
    from .experiment import baseline_summary, fmt_gain

    final, best = results["final"], results["best"]
    print(f"{results['method']}: final held-out alignment {final['alignment']:.4f} (round {final['round']}), "
          f"conditioning gain {fmt_gain(final)}, best {best['alignment']:.4f} (round {best['round']}); "
          f"baselines: {baseline_summary(results['baselines'])}"
          f"{_unseen_summary(final)}\nresults: {out_dir}")


def _unseen_summary(final: dict) -> str:
    """The reward-model case in one line, where the run has unseen questions (run-config heldout-questions)."""
    unseen = final.get("unseen")
    if not unseen:
        return ""
    gain = unseen.get("conditioning_gain")
    return (f"\nunseen questions ({unseen['n_questions']} group-question pairs): {unseen['alignment']:.4f}, with an "
            f"uninformative context {unseen['no_context']:.4f}, conditioning gain "
            f"{'n/a' if gain is None else format(gain, '+.4f')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pluralllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="load a dataset and print per-group question counts and what was filtered")
    _dataset_args(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("embed", help="embed every (question, option) of a dataset once, into the cache")
    _dataset_args(p)
    p.add_argument("--model", default="minilm", help="minilm | smollm2 | a hub id | a local model folder")
    p.add_argument("--cache-dir", default="", help="default ~/.cache/pluralllm")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("centralized", help="train the predictor centrally on the pooled training groups")
    _run_config_arg(p)
    p.add_argument("--compute-matched", action="store_true", help="num-server-rounds x local-steps epochs: as many "
                   "episodes (the same work) as the federated run, instead of num-server-rounds epochs")
    _overwrite_arg(p)
    p.set_defaults(func=cmd_centralized)

    p = sub.add_parser("simulate", help="run the Flower app in simulation (flwr run, checked and cleaned up)")
    _run_config_arg(p)
    p.add_argument("--num-supernodes", type=int, default=0, help="virtual SuperNodes (default: one per training group)")
    p.add_argument("--timeout", type=float, default=None, help="stop the run after this many seconds")
    p.add_argument("--quiet", action="store_true", help="show PluralLLM's progress lines only, not Flower's log")
    _overwrite_arg(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("bundle", help="write per-group data bundles: all a group's SuperNode (or the server, for "
                       "the held-out groups) needs, and nothing of any other group")
    _run_config_arg(p)
    p.add_argument("--group", action="append", metavar="NAME", help="a group to bundle (repeatable)")
    p.add_argument("--all", action="store_true", help="every training and held-out group of the run")
    p.add_argument("--out-dir", required=True, help="folder for the <group>.bundle.safetensors files")
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser("deploy", help="the app as a real federation: a SuperLink and one SuperNode per group")
    deploy = p.add_subparsers(dest="deploy_command", required=True)
    q = deploy.add_parser("local", help="a SuperLink and N SuperNodes on 127.0.0.1: run, collect results, stop all")
    _run_config_arg(q)
    q.add_argument("--groups", type=int, required=True, help="SuperNodes: one for each of the first N training groups")
    q.add_argument("--insecure", action="store_true", help="no TLS (loopback only; TLS with a demo CA otherwise)")
    q.add_argument("--timeout", type=float, default=None, help="stop the run after this many seconds")
    q.add_argument("--quiet", action="store_true", help="show PluralLLM's progress lines only, not Flower's log")
    q.add_argument("--cold-clientapps", action="store_true", help="every ClientApp process imports Flower and torch "
                   "itself, as Flower's own does (default: forked from one warm process, as `deploy clientapp-server` does)")
    _overwrite_arg(q)
    q.set_defaults(func=cmd_deploy_local)
    q = deploy.add_parser("clientapp-server", help="warm ClientApp starts for SuperNodes on this machine: Flower and "
                          "torch imported once, a forked process per message (start SuperNodes with PATH=DIR/bin:$PATH)")
    q.add_argument("directory", help="folder for its socket and bin/flwr-clientapp (created, owner-only)")
    q.add_argument("--preload", default=",".join(PRELOAD), help="modules imported once, comma-separated")
    q.set_defaults(func=cmd_deploy_clientapp_server)
    q = deploy.add_parser("certs", help="a demo certificate authority and a SuperLink certificate (TLS)")
    q.add_argument("--out-dir", required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    q.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP", help="an address the SuperNodes "
                   "use to reach the SuperLink (repeatable); 127.0.0.1 and localhost are always included")
    q.add_argument("--days", type=int, default=365, help="validity of the certificates")
    q.set_defaults(func=cmd_deploy_certs)

    p = sub.add_parser("demo", help="the main job: federated simulation on real data, then the report")
    _dataset_args(p, with_json=False)
    p.add_argument("--rounds", type=int, default=DEMO_ROUNDS,
                   help=f"server rounds (default {DEMO_ROUNDS}; README gives the time they take on 2 CPU cores)")
    _run_config_arg(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("reproduce", help="the paper's comparison (FedAvg, FedProx, centralized) and ablations on "
                       "real data, then docs/results.md with its figures")
    p.add_argument("--dataset", action="append", metavar="NAME[=PATH]", help="opinionqa=<human_resp folder>, "
                   "globalopinionqa (from the hub) or globalopinionqa=<global_opinions.csv>; repeatable")
    p.add_argument("--scale", choices=["smoke", "default", "full"], default="default",
                   help="smoke: minutes; default: 24 rounds of GPO, 16-30 of the default predictor (README gives "
                   "its time on 2 CPU cores); full: the paper's")
    p.add_argument("--rounds", type=int, default=0, help="federated rounds (overrides the scale's)")
    p.add_argument("--seeds", type=_int_list, default=None, help="comma-separated seeds (overrides the scale's)")
    p.add_argument("--embedders", type=lambda t: t.split(","), default=None,
                   help="comma-separated embedders of the embedder ablation (overrides the scale's)")
    p.add_argument("--out", default="", help="run directories (default runs/reproduce/<scale>)")
    p.add_argument("--report", default="", help="the report, its figures in a folder beside it (default "
                   "docs/results.md; <out>/results.md for the smoke scale)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the runs in --out")
    _run_config_arg(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("score", help="predict groups' answer distributions with a trained checkpoint (reward model)")
    p.add_argument("--checkpoint", required=True, help="best.safetensors or last.safetensors of a run")
    p.add_argument("--context", required=True, help="JSON: {\"group\", \"answers\": [{\"question\", \"options\", "
                   "\"distribution\"}]} or a list of such groups")
    p.add_argument("--questions", required=True, help="JSON: [{\"question\", \"options\"}, ...]")
    p.add_argument("--cache-dir", default="", help="embedding cache (default ~/.cache/pluralllm)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("align", help="steer a language model toward groups' opinions with GRPO, a run's predictor as "
                       "the reward model, on questions the predictor never trained on; report in runs/align/<ts>/")
    p.add_argument("--run", required=True, help="a training run's directory, trained with heldout-questions > 0")
    p.add_argument("--groups", required=True, help="groups of the run's data to align to, separated by "
                   "commas, or by semicolons when a name has a comma (\"Less than $30,000;Hispanic\")")
    p.add_argument("--measure", default="", help="groups to measure too, not aligned to (as --groups)")
    p.add_argument("--policy", default="smollm2", help="smollm2 (offline SmolLM2-135M-Instruct) | a hub id | a folder")
    p.add_argument("--aggregate", default="mean", choices=["mean", "min", "adaptive"], help="several groups' rewards")
    p.add_argument("--federated", action="store_true",
                   help="compute each group's rewards on its own node of the run's federation (a Flower simulation), "
                   "so its context answers never reach the aligner")
    # defaults: align.AlignSettings
    p.add_argument("--steps", type=int, default=None, help="GRPO steps (default 1000)")
    p.add_argument("--beta", type=float, default=None, help="KL coefficient and the reward's scale")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--generations", type=int, default=None, help="completions per prompt")
    p.add_argument("--prompts-per-step", type=int, default=None)
    p.add_argument("--trainable-layers", type=int, default=None,
                   help="the policy's last blocks that learn (0 = all)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between measurements")
    p.add_argument("--temperature", type=float, default=None, help="adaptive: nats of KL(policy || group's "
                   "prediction) that weigh a group e times more (default 0.05)")
    p.add_argument("--adapt-every", type=int, default=None, help="adaptive: steps between re-weightings (default 5)")
    p.add_argument("--trainer", default=None, choices=["one-token", "trl"],  # align.TRAINERS
                   help="one-token (default): GRPO for one-letter answers with the frozen blocks computed once per "
                   "question (grpo.py); trl: TRL's GRPOTrainer, which runs the whole LM every step")
    p.add_argument("--context", type=int, default=20, help="context answers per group given to the predictor")
    p.add_argument("--questions", type=int, default=0, help="a seeded subset of the unseen questions (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="", help="embeddings and the dequantised policy (default ~/.cache/pluralllm)")
    p.add_argument("--out", default="", help="default runs/align/<timestamp>")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("report", help="plots and a Markdown table from one or more run directories")
    p.add_argument("runs", nargs="+", help="run directories (each with results.json)")
    p.add_argument("--out", default="", help="where to write report.md and the PNGs (default: the first run)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # what was asked, for reports that name the command that wrote them
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (D.DataError, ConfigError, ValueError, FileNotFoundError, RuntimeError) as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"pluralllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (processes.stop_signals_as_interrupt)
        print(f"pluralllm: interrupted{f' ({exc})' if str(exc) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
