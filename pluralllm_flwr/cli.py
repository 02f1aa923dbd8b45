"""The `pluralllm` command: thin wrappers that parse arguments, call the library and print."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from . import data as D
from .config import ConfigError, RunConfig


def _dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=["globalopinionqa", "opinionqa"], default="globalopinionqa")
    parser.add_argument("--path", default="", help="local data: global_opinions.csv or OpinionQA's human_resp "
                        "folder (GlobalOpinionQA is downloaded from the hub when omitted)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def cmd_data(args: argparse.Namespace) -> int:
    cfg = RunConfig(dataset=args.dataset, data_path=args.path)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pluralllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("data", help="load a dataset and print per-group question counts and what was filtered")
    _dataset_args(p)
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (D.DataError, ConfigError) as exc:
        print(f"pluralllm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
