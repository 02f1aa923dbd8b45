"""`pluralllm align`'s report: <out>/report.md with a before/after table per group and a figure of
each group's alignment against GRPO steps, from <out>/align.json alone (so it can be rewritten)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .align import ALIGN_FILE, REWARD_REPLY, TRAINERS  # noqa: E402

REPORT_FILE, FIGURE_FILE = "report.md", "alignment.png"


def write_align_report(out: str | Path) -> Path:
    """Write report.md and alignment.png beside align.json; returns the report's path."""
    out = Path(out)
    result = json.loads((out / ALIGN_FILE).read_text())
    history, s = result["history"], result["settings"]
    before, after = history[0], history[-1]
    trained = f"the last {s['trainable_layers']} blocks" if s["trainable_layers"] else "every block"
    lines = [f"# Aligning `{result['policy']}` to {', '.join(result['groups'])}", "",
             f"GRPO ({TRAINERS[s.get('trainer', 'trl')]}), {after['step']} steps ({s['prompts_per_step']} "
             f"prompts × {s['generations']} completions per "
             f"step, lr {s['learning_rate']:g}, {trained} trained: {result['trainable_parameters']:,} parameters), "
             f"log-ratio reward under KL beta {s['beta']:g}, `{s['aggregate']}` aggregation over the groups, seed "
             f"{s['seed']}; {len(result['questions'])} questions the predictor never trained on (run "
             f"`{result['run']}`); {result['seconds']:.0f} s.", "",
             "The LM's opinion is its next-token distribution over the option letters; alignment is 1 − JS distance "
             "to the group's true answers. *Target*: the predictor's prediction for the group (what its reward "
             "pulls toward) against the same truth.", "",
             "| group | target | before | after | change | LM to target, before → after |", "|---|---|---|---|---|---|"]
    for g in before["per_group"]:  # the groups aligned to, then any only measured
        lines.append(_group_row(g, result["targets"].get(g), before, after))
    lines += [_row("**mean of the groups aligned to**", "", before["mean"], after["mean"], ""),
              _row("**worst group**", "", before["worst"], after["worst"], "", before["worst_group"],
                   after["worst_group"]), "",
              f"Share of the next token's probability on the option letters: {before['letter_mass']:.2f} before, "
              f"{after['letter_mass']:.2f} after" + (". Completions naming no option of their question: "
              f"{result['unparsable']} of {result['scored']} (GRPO learns nothing from them)."
              if s.get("trainer", "trl") == "trl" else " (the one-token trainer samples the question's options alone)."),
              "",
              *_weights_lines(result), _rewards_line(result, out), "",
              f"![alignment per group against GRPO steps]({FIGURE_FILE})", ""]
    _figure(result, out / FIGURE_FILE)
    (out / REPORT_FILE).write_text("\n".join(lines))
    return out / REPORT_FILE


def _weights_lines(result: dict) -> list[str]:
    """Adaptive aggregation: each group's weight at every measurement (softmax of the policy's KL from its
    prediction over the temperature, re-measured every adapt-every steps)."""
    s = result["settings"]
    if s["aggregate"] != "adaptive" or "weights" not in result["history"][0]:
        return []
    lines = [f"Adaptive weights (temperature {s['temperature']:g} nats, re-weighed every {s['adapt_every']} steps; "
             "each set from the opinions measured at its step, used from the next step on):",
             "", "| step | " + " | ".join(result["groups"]) + " |", "|---|" + "---|" * len(result["groups"])]
    lines += [f"| {h['step']} | " + " | ".join(f"{h['weights'][g]:.3f}" for g in result["groups"]) + " |"
              for h in result["history"]]
    return lines + [""]


def _rewards_line(result: dict, out: Path) -> str:
    """Where the rewards were computed; federated, what the messages carried (the ServerApp's audit)."""
    if result.get("rewards") == "oracle":
        return ("Rewards from the groups' true answers on these questions (an oracle, benchmarks/align_groups.py "
                "--oracle): what a perfect reward model would give, not a deployable reward.")
    if result.get("rewards") != "federated":
        return "Rewards computed centrally: the aligner read each group's context answers."
    audit = json.loads((out / REWARD_REPLY).read_text())["audit"]
    kinds = []
    for kind in dict.fromkeys(a["type"] for a in audit):
        sides = {d: sorted({_carried(a) for a in audit if a["type"] == kind and a["direction"] == d})
                 for d in ("to node", "from node")}
        kinds.append(f"`{kind}`, to a node: {' / '.join(sides['to node'])}; back: {' / '.join(sides['from node'])}")
    return (f"Rewards computed federated: each group's on its own node of the run's federation, from context "
            f"answers that never left it. Every message, from the ServerApp's audit ({len(audit)} messages, in "
            f"{REWARD_REPLY}): " + ". ".join(kinds) + ".")


def _carried(message: dict) -> str:
    """One audited message in words: each record's array names and shapes, or its keys."""
    if "error" in message:
        return f"error ({message['error']})"
    parts = []
    for name, record in message["records"].items():
        if "keys" in record:
            parts.append(f"{name} [{', '.join(record['keys']) or 'empty'}]")
        elif len(record["arrays"]) <= 3:
            parts.append(f"{name} [" + ", ".join(f"{k} of shape {v}" for k, v in record["arrays"].items()) + "]")
        else:
            parts.append(f"{name} [{len(record['arrays'])} arrays]")
    return "; ".join(parts)


def _row(label: str, target: str, before: float, after: float, to_target: str, who_before: str = "",
         who_after: str = "") -> str:
    named = (lambda v, who: f"{v:.4f} ({who})" if who else f"{v:.4f}")
    return (f"| {label} | {target} | {named(before, who_before)} | {named(after, who_after)} | {after - before:+.4f} "
            f"| {to_target} |")


def _group_row(group: str, target: float | None, before: dict, after: dict) -> str:
    if target is None:
        return _row(f"{group} (measured only)", "–", before["per_group"][group], after["per_group"][group], "–")
    return _row(group, f"{target:.4f}", before["per_group"][group], after["per_group"][group],
                f"{before['to_prediction'][group]:.4f} → {after['to_prediction'][group]:.4f}")


def _figure(result: dict, path: Path) -> None:
    history = result["history"]
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    for g in history[0]["per_group"]:
        aligned = g in result["targets"]
        line, = ax.plot(steps, [h["per_group"][g] for h in history], marker="o" if aligned else ".",
                        linestyle="-" if aligned else "--", label=g if aligned else f"{g} (measured only)")
        if aligned:
            ax.axhline(result["targets"][g], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("LM's alignment to the group (1 − JS)")
    ax.set_title("dotted: the predictor's own alignment (the target)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
