"""`pluralllm align`: steer a language model toward groups' opinions with GRPO, the trained predictor
as the reward model (PluralLLM's open question 2).

The LM's opinion on a multiple-choice question is its next-token distribution over the question's
option letters after `reward.format_question`'s prompt, renormalised over those letters: how OpinionQA
and GlobalOpinionQA measure an LM's opinions. Its alignment to a group is 1 − JS distance to the group's
true answers. Only the evaluation reads those; training sees the predictor's rewards alone.

The reward (`reward.GroupReward` with a reference): a completion that picks option c earns from group g

    r_g(c) = beta · log(p_g(c) / pi_ref(c)),

with p_g the predictor's prediction from the group's context answers (read by the aligner, or, with
`--federated`, made on the group's own node so that they never leave it: reward_queries.py) and pi_ref
the LM's opinion before training. GRPO (with the same beta as its KL coefficient and unscaled advantages) maximises
E_pi[r] − beta·KL(pi || pi_ref), whose maximiser is pi ∝ pi_ref·exp(r/beta) = p_g (`kl_optimum`): the
policy moves toward the group's distribution instead of collapsing onto its likeliest option, which a
reward of p_g(c) alone would do. Several groups' rewards are combined by `reward.GroupAggregator`: under
`mean` the optimum is the normalised geometric mean of the p_g, under `min` their normalised pointwise
minimum; `adaptive` weighs group g by softmax(KL(pi ‖ p_g) / temperature), the policy's distance from
each group's prediction, measured on its whole answer distributions every `adapt_every` steps.

Only the last `trainable_layers` blocks of the LM learn (embeddings and earlier blocks stay frozen). The
default trainer (grpo.py) samples each answer from the LM's opinion on its question and runs only those
blocks, on hidden states computed once per question: a step in a fraction of a second on a CPU. With
`trainer="trl"` TRL's GRPOTrainer generates, restricted to the letters A..(the most options of any
question); a letter beyond its own question's options teaches nothing (`reward.neutral_unparsable`).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import grpo
from .config import RunConfig, cache_folder
from .data import Question, seeded_rng
from .embeddings import LETTERS, resolve_model
from .experiment import prepare_experiment
from .metrics import alignments
from .results import BEST_CHECKPOINT, load_results
from .reward import GroupAggregator, GroupContext, GroupReward, GroupRewardModel, format_question
from .reward_queries import RewardRequest, group_context
from .simulation import progress_only, simulate

ALIGN_FILE = "align.json"
TRAINERS = {"one-token": "the one-token trainer, grpo.py", "trl": "TRL's GRPOTrainer"}  # --trainer: how reports name it
REWARD_REQUEST, REWARD_REPLY = "reward-request.json", "reward-reply.json"  # federated rewards (reward_queries.py)


class AlignError(ValueError):
    """A run, group, policy or setting `pluralllm align` cannot use; says which and why."""


@dataclass(frozen=True)
class AlignSettings:
    """GRPO's settings (`pluralllm align`'s options)."""

    # the defaults suit the one-token trainer (a step takes under 0.17 s for SmolLM2-135M on 2 CPU cores); TRL's
    # runs the whole LM per completion: e.g. steps=60, generations=8, prompts_per_step=2 take about 6 minutes
    steps: int = 1000               # GRPO steps
    beta: float = 0.1               # the KL coefficient, and the log-ratio reward's scale
    learning_rate: float = 1e-4
    generations: int = 32           # completions per prompt (GRPO's group)
    prompts_per_step: int = 4
    trainable_layers: int = 2       # the LM's last blocks that learn; 0 = every parameter
    eval_every: int = 100           # steps between measurements of the LM's opinions
    aggregate: str = "mean"         # reward.AGGREGATES
    temperature: float = 0.05       # adaptive: nats of KL(pi ‖ p_g) that make one group's weight e times another's
    adapt_every: int = 5            # adaptive: steps between re-weightings from the policy's opinions
    seed: int = 0
    trainer: str = "one-token"      # TRAINERS: grpo.py's GRPO for one-letter answers, or TRL's GRPOTrainer

    def __post_init__(self) -> None:
        for name in ("steps", "generations", "prompts_per_step", "eval_every", "adapt_every"):
            if getattr(self, name) < 1:
                raise AlignError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.generations < 2:
            raise AlignError(f"generations must be at least 2 (GRPO compares a prompt's completions), got "
                             f"{self.generations}")
        if self.trainer not in TRAINERS:
            raise AlignError(f"trainer must be one of {', '.join(TRAINERS)}, got {self.trainer!r}")
        if not self.beta > 0 or not self.learning_rate > 0 or not self.temperature > 0 or self.trainable_layers < 0:
            raise AlignError(f"beta ({self.beta}), learning-rate ({self.learning_rate}) and temperature "
                             f"({self.temperature}) must be > 0 and trainable-layers ({self.trainable_layers}) >= 0")


def kl_optimum(reference: np.ndarray, rewards: np.ndarray, beta: float) -> np.ndarray:
    """argmax over distributions pi of E_pi[r] − beta·KL(pi || reference): pi ∝ reference·exp(r / beta)."""
    z = np.log(np.clip(np.asarray(reference, np.float64), 1e-12, None)) + np.asarray(rewards, np.float64) / beta
    z = np.exp(z - z.max())
    return z / z.sum()


# ----------------------------------------------------------------------------- what to align to


@dataclass
class AlignmentTask:
    """The questions to align on (none of them trained on by the predictor), the groups aligned to with
    how their context is drawn (`context` of their seen questions, with `seed`), those contexts where
    the aligner reads them (central rewards; federated, they stay on the groups' nodes), and the true
    answers of every measured group (those aligned to and any others named; only the evaluation reads
    them)."""

    questions: list[Question]
    groups: list[str]
    context: int
    seed: int
    contexts: list[GroupContext]
    truth: dict[str, list[np.ndarray]]


def alignment_task(run: str | Path, groups: Sequence[str], context: int = 20, max_questions: int = 0,
                   seed: int = 0, measure_also: Sequence[str] = (), read_contexts: bool = True) -> AlignmentTask:
    """From a training run trained with heldout-questions > 0: its unseen questions that every group
    (aligned to or `measure_also`) answered (a seeded `max_questions` of them, 0 = all), and, unless
    `read_contexts` is False, per group aligned to its context (`reward_queries.group_context`)."""
    results = load_results(run)
    cfg = RunConfig.from_mapping(results["config"])
    if cfg.heldout_questions <= 0:
        raise AlignError(f"{run}: trained with heldout-questions=0, so the predictor trained on every question; "
                         "align on questions it never saw: train with e.g. -c 'heldout-questions=0.1'")
    if not groups or len(set(groups)) != len(groups):
        raise AlignError(f"name one or more distinct groups to align to, got {list(groups)}")
    if context < 1:
        raise AlignError(f"context must be at least 1 answer per group, got {context}")
    measured = list(groups) + [g for g in dict.fromkeys(measure_also) if g not in groups]
    exp = prepare_experiment(cfg, progress=False)
    unknown = [g for g in measured if g not in exp.data.answers]
    if unknown:
        raise AlignError(f"{run}: no group {unknown} in its data; it has {sorted(exp.data.answers)}")
    common = sorted(set.intersection(*(set(exp.question_ids(g, "unseen")) for g in measured)))
    if not common:
        raise AlignError(f"{run}: the groups {measured} answered no unseen question in common")
    if 0 < max_questions < len(common):
        common = sorted(seeded_rng(seed, "align-questions").choice(common, max_questions, replace=False).tolist())
    contexts = [group_context(exp, g, context, seed) for g in groups] if read_contexts else []
    return AlignmentTask([exp.data.questions[i] for i in common], list(groups), context, seed, contexts,
                         {g: [exp.data.answers[g][i] for i in common] for g in measured})


def central_predictions(task: AlignmentTask, run: str | Path, cache_dir: str | Path | None = None
                        ) -> dict[str, list[np.ndarray]]:
    """Each group's predicted answers on the task's questions, the aligner reading its context."""
    model = GroupRewardModel.from_checkpoint(checkpoint_of(run), cache_dir=cache_dir)
    return model.predict_groups(task.contexts, task.questions)


def federated_predictions(task: AlignmentTask, run: str | Path, out: Path, echo=progress_only
                          ) -> dict[str, list[np.ndarray]]:
    """The same predictions made on the groups' own nodes (reward_queries.py), in a Flower simulation of
    the run's federation: one virtual node per training group. The request and the reply, with its audit
    of every message, are kept in `out`."""
    cfg = RunConfig.from_mapping(load_results(run)["config"])
    nodes = prepare_experiment(cfg, progress=False).split.train
    unhosted = [g for g in task.groups if g not in nodes]
    if unhosted:
        raise AlignError(f"federated rewards come from the nodes of the run's training groups {nodes}; {unhosted} "
                         "has no node in its federation (align to it with central rewards)")
    out = Path(out).resolve()
    request = RewardRequest(str(checkpoint_of(run).resolve()), task.groups, task.context, task.seed, task.questions,
                            str(out / REWARD_REPLY))
    path = request.write(out / REWARD_REQUEST)
    simulate(cfg.replace(reward_request=str(path), out_dir=str(out)), len(nodes), echo=echo)
    reply = json.loads((out / REWARD_REPLY).read_text())
    return {g: [np.asarray(p, np.float64) for p in reply["predictions"][g]] for g in task.groups}


# ----------------------------------------------------------------------------- the policy


def policy_folder(policy: str, cache_dir: str | Path | None = None) -> str:
    """A folder or hub id that `from_pretrained` loads, and TRL with it the reference model. A GGUF file
    (the built-in 'smollm2') cannot be saved as it is loaded: it is dequantised once into the cache."""
    source = resolve_model(policy)
    if source.gguf_file is None:
        return source.path
    digest = hashlib.sha256(json.dumps(source.identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_folder(cache_dir) / "policies" / digest
    if not (folder / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; a plain copy does not
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(loaded.state_dict())
        scratch = folder.with_name(folder.name + ".partial")
        shutil.rmtree(scratch, ignore_errors=True)
        plain.save_pretrained(scratch)
        tok.save_pretrained(scratch)
        scratch.rename(folder)
    return str(folder)


def load_policy(folder: str):
    """(model, tokenizer) of a causal LM, in float32, evaluation mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise AlignError(f"cannot load a causal LM from {folder}: {str(exc).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def letter_tokens(tok, n: int) -> list[int]:
    """The token of each letter A, B, ... (n of them) as it follows "Answer:": " A" where each is one
    token, else "A"."""
    for prefix in (" ", ""):
        ids = [tok.encode(prefix + letter, add_special_tokens=False) for letter in LETTERS[:n]]
        if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == n:
            return [i[0] for i in ids]
    raise AlignError(f"the policy's tokenizer does not encode the letters A..{LETTERS[n - 1]} as distinct single "
                     "tokens, so its opinion cannot be read from one next token")


@torch.no_grad()
def lm_opinions(model, tok, questions: Sequence[Question], letters: Sequence[int],
                batch_size: int = 8) -> tuple[list[np.ndarray], float]:
    """The LM's answer distribution on each question (its next-token probabilities of the option
    letters, renormalised over them), and the mean share of the next token's probability that falls
    on those letters (how well the LM follows the format)."""
    side, tok.padding_side = tok.padding_side, "right"  # positions stay those of the unpadded prompt
    opinions, mass = [], []
    try:
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            enc = tok([format_question(q) for q in chunk], return_tensors="pt", padding=True).to(model.device)
            hidden = model.get_decoder()(**enc).last_hidden_state
            last = enc["attention_mask"].sum(1) - 1
            logits = model.get_output_embeddings()(hidden[torch.arange(len(chunk)), last])
            o, m = grpo.letter_opinions(logits, [letters[:len(q.options)] for q in chunk])
            opinions, mass = opinions + o, mass + m
    finally:
        tok.padding_side = side
    return opinions, float(np.mean(mass))


def summary(opinions: list[np.ndarray], mass: float, task: AlignmentTask,
            predicted: dict[str, list[np.ndarray]]) -> dict:
    """The LM's opinions (`lm_opinions`) scored: its alignment to each measured group's true answers; the
    mean and the worst over the groups aligned to; its alignment to the predictor's prediction for each
    of those (what the reward pulls toward), its letter mass and the opinions themselves."""
    per_group = {g: float(np.mean(alignments(opinions, truth))) for g, truth in task.truth.items()}
    worst = min(task.groups, key=per_group.get)
    return {"per_group": per_group, "mean": float(np.mean([per_group[g] for g in task.groups])), "worst_group": worst,
            "worst": per_group[worst], "letter_mass": mass,
            "to_prediction": {g: float(np.mean(alignments(opinions, p))) for g, p in predicted.items()},
            "opinions": [o.round(6).tolist() for o in opinions]}


def _freeze_all_but_last(model, layers: int) -> int:
    """Freeze every parameter but those of the last `layers` blocks and the final norm (0: train all);
    returns the number of trainable parameters."""
    if layers:
        blocks = model.get_decoder().layers
        if layers > len(blocks):
            raise AlignError(f"trainable-layers={layers}, but the policy has {len(blocks)} blocks")
        model.requires_grad_(False)
        for block in blocks[-layers:]:
            block.requires_grad_(True)
        model.get_decoder().norm.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- GRPO


@dataclass
class Alignment:
    """What `align` measured: the LM's alignment before, along and after GRPO, and the targets'."""

    settings: dict
    policy: str
    run: str
    rewards: str                                    # "central", "federated" (on the groups' nodes) or "oracle" (truth)
    groups: list[str]
    questions: list[str]
    targets: dict[str, float]                       # the predictor's p_g against the group's truth
    history: list[dict] = field(default_factory=list)  # {"step", **summary(...)}, step 0 = before
    trainable_parameters: int = 0
    seconds: float = 0.0


def align(task: AlignmentTask, predicted: dict[str, list[np.ndarray]], policy: str, settings: AlignSettings,
          out: Path, run: str = "", rewards: str = "central", cache_dir: str | Path | None = None,
          echo=print) -> Alignment:
    """GRPO on `task.questions` with the log-ratio group reward on `predicted` (each group's predicted
    answers, `central_predictions` or `federated_predictions`, which `rewards` names); the LM's opinions
    are measured before, every `eval_every` steps and after. Writes <out>/align.json."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    folder = policy_folder(policy, cache_dir)
    model, tok = load_policy(folder)
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # TRL's trainer would move it; the one-token one does not
    n_letters = max(len(q.options) for q in task.questions)
    letters = letter_tokens(tok, n_letters)
    keys = [q.key for q in task.questions]
    reference, mass = lm_opinions(model, tok, task.questions, letters)  # the base LM: also step 0's measurement
    # a letter beyond a question's options is the only unparsable answer: GRPO ignores it (reward.neutral_unparsable)
    # adaptive: the expected rewards' differences are beta·(differences of KL(pi ‖ p_g)), hence beta·temperature
    aggregator = GroupAggregator(task.groups, settings.aggregate, temperature=settings.beta * settings.temperature,
                                 batch_updates=False)
    reward = GroupReward(dict(zip(keys, task.questions)), {g: dict(zip(keys, p)) for g, p in predicted.items()},
                         aggregator, question_column="question", reference=dict(zip(keys, reference)),
                         beta=settings.beta, neutral_in_groups_of=settings.generations)
    adaptive = settings.aggregate == "adaptive"
    result = Alignment(asdict(settings), policy, str(run), rewards, task.groups, keys,
                       {g: float(np.mean(alignments(predicted[g], task.truth[g]))) for g in task.groups})
    result.trainable_parameters = _freeze_all_but_last(model, settings.trainable_layers)

    def look(step: int, opinions: list[np.ndarray], mass: float, measure: bool) -> None:
        """Re-weigh the groups (adaptive) from the policy's opinions, then record them if `measure`."""
        if adaptive:
            aggregator.observe(reward.expected_rewards(keys, opinions))
        if not measure:
            return
        weights = {"weights": aggregator.weights} if adaptive else {}
        result.history.append({"step": step, **summary(opinions, mass, task, predicted), **weights})
        h = result.history[-1]
        echo(f"align: step {step}: alignment " + ", ".join(f"{g} {v:.4f}" for g, v in h["per_group"].items())
             + f"; worst {h['worst']:.4f}; letter mass {h['letter_mass']:.2f}"
             + ("; weights " + ", ".join(f"{g} {w:.2f}" for g, w in weights["weights"].items()) if adaptive else ""))

    look(0, reference, mass, measure=True)

    def after_step(step: int, measured: Callable[[], tuple[list[np.ndarray], float]]) -> None:
        measure = step % settings.eval_every == 0 or step == settings.steps
        if measure or (adaptive and step % settings.adapt_every == 0):
            look(step, *measured(), measure)

    if settings.trainer == "one-token":
        policy_view = grpo.OpinionPolicy(model, tok, task.questions, letters, settings.trainable_layers)
        policy_view.check(reference)
        grpo.train(policy_view, reward, keys, reference, steps=settings.steps, learning_rate=settings.learning_rate,
                   beta=settings.beta, generations=settings.generations, prompts_per_step=settings.prompts_per_step,
                   seed=settings.seed, on_step=lambda step: after_step(step, policy_view.opinions))
    else:
        _train_with_trl(model, tok, task, reward, letters, settings, out, after_step)
    result.seconds = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / ALIGN_FILE).write_text(json.dumps({**asdict(result), "unparsable": reward.unparsable,
                                              "scored": reward.scored}, indent=1))
    return result


def _train_with_trl(model, tok, task: AlignmentTask, reward: GroupReward, letters: list[int],
                    settings: AlignSettings, out: Path, after_step) -> None:
    """GRPO with TRL's `GRPOTrainer`: one-token completions restricted to the option letters; after each
    step `after_step(step, measure)` with `measure()` the LM's opinions through the whole model."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    def measured() -> tuple[list[np.ndarray], float]:
        model.eval()
        try:
            return lm_opinions(model, tok, task.questions, letters)
        finally:
            model.train()

    class Measure(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            after_step(state.global_step, measured)

    dataset = Dataset.from_dict({"prompt": [format_question(q) for q in task.questions],
                                 "question": [q.key for q in task.questions]})
    others = sorted(set(range(len(tok))) - set(letters))
    args = GRPOConfig(output_dir=str(out / "grpo"), max_steps=settings.steps, learning_rate=settings.learning_rate,
                      per_device_train_batch_size=settings.generations * settings.prompts_per_step,
                      num_generations=settings.generations, max_completion_length=1, beta=settings.beta,
                      scale_rewards="none", use_bias_correction_kl=True, temperature=1.0, generation_kwargs={"suppress_tokens": others},
                      logging_steps=1, report_to="none", use_cpu=not torch.cuda.is_available(), save_strategy="no",
                      seed=settings.seed, data_seed=settings.seed, dataloader_num_workers=0, disable_dropout=True,
                      activation_checkpointing=False)  # one-token completions need no memory saving; and
    # checkpointed blocks behind frozen ones would get no gradient. use_bias_correction_kl (TRL's default, pinned):
    # the KL term's expected gradient is that of KL(pi ‖ pi_ref), the penalty the reward's optimum is derived for
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset, processing_class=tok,
                          callbacks=[Measure()])
    try:
        trainer.train()
    finally:
        shutil.rmtree(out / "grpo", ignore_errors=True)  # TRL's scratch (no checkpoints are saved)


def checkpoint_of(run: str | Path) -> Path:
    path = Path(run) / BEST_CHECKPOINT
    if not path.is_file():
        raise AlignError(f"{run}: no {BEST_CHECKPOINT}; pass a training run's directory (pluralllm simulate / "
                         "centralized)")
    return path
