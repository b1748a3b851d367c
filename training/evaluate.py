"""One evaluation for all policies: base, SFT, PPO, DPO side by side, per family.

- Preference: each policy answers the same held-out prompts (never trained on by the
  judge) from the same random numbers; a judge reward model that none of the policies was
  trained against scores the replies. Per family (helpful, harmless): the judge's mean
  score with a 95% confidence interval, pairwise win rates, the KL to a reference policy
  and the reply length (length is the first bias reviewers ask about).
- Capability: zero-shot tasks through EleutherAI's lm-evaluation-harness (``lm_eval``'s
  Python API, the ``eval`` extra): any task name it knows, or a task YAML file (or folder)
  read offline, e.g. tests/data/hh_mc; accuracy with its standard error per policy, and the
  alignment tax or bonus: accuracy minus the base policy's, negative where alignment cost
  capability (Bai et al. 2022).

Writes evaluation.md (the tables), evaluation.png and evaluation.json into --out, and the
tables into each policy's model card (README.md in its folder), in a marked section that a
re-run replaces.

    python -m training.evaluate --policy base=runs/base --policy sft=runs/sft \\
        --policy ppo=runs/ppo/policy --judge runs/judge --tasks hellaswag,tests/data/hh_mc
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from training import models, run
from training.best_of_n import encode_queries, mean_with_ci, policy_chat, reply_content
from training.common import UsageError, run_cli
from training.ppo_eval import held_out_kl, make_judge, prompts_unseen_by, reply_texts, verdict
from training.rollout import rollout
from training.text import end_of_turn_id

CARD_START = "<!-- training.evaluate: start (replaced on every run) -->"
CARD_END = "<!-- training.evaluate: end -->"
SETTINGS_FILES = ("settings.json", "args.json")  # what the trainers write beside a policy


@dataclass(frozen=True)
class Args:
    """Evaluate policies side by side: judge preference per family, capability, alignment tax."""

    policy: tuple[str, ...] = ()
    """NAME=DIR of a policy (a saved causal LM: an SFT run, PPO's policy/, a DPO run); repeat
    the flag for each policy"""
    judge: str | None = None
    """a reward-model run directory none of the policies was trained against; scores the replies"""
    reference: str | None = None
    """NAME of the policy the KL is measured to; default `sft` when given, else the first"""
    base: str | None = None
    """NAME of the policy the alignment tax is measured from; default `base` when given, else
    the first"""
    tasks: str = ""
    """capability tasks, comma-separated: lm_eval task names, or paths of task YAML files or
    folders (read offline, e.g. tests/data/hh_mc)"""
    limit: int | None = None
    """at most this many examples per capability task (all when unset)"""
    data: str | None = None
    """the release whose held-out prompts are answered; default: the bundled sample"""
    split: str | None = None
    """the split drawn from after the others; default `train` where the data has it"""
    prompts: int = 64
    """held-out prompts answered by every policy (distinct, never trained on by the judge)"""
    query_length: int = 128
    """longest prompt in tokens; longer prompts keep their end (the latest turns)"""
    response_length: int = 32
    """most tokens sampled per reply"""
    temperature: float = 0.7
    """sampling temperature (the KL is measured at the same temperature)"""
    batch_size: int = 8
    """prompts per sampling batch, and lm_eval's batch size"""
    seed: int = 1
    """seed of the prompt choice and of the sampling (the same random numbers for every policy)"""
    out: str = "runs/evaluation"
    """where evaluation.md, evaluation.png and evaluation.json go"""
    cards: bool = True
    """write the results into each policy's README.md (a marked section, replaced on re-run)"""


# ---- the policies and what they were trained against --------------------------------------


def parse_policies(specs: tuple[str, ...]) -> dict[str, Path]:
    """{name: folder} from NAME=DIR values, in the order given.

    >>> parse_policies(("base=.",))
    {'base': PosixPath('.')}
    """
    policies: dict[str, Path] = {}
    for spec in specs:
        name, equals, folder = spec.partition("=")
        if not equals or not name or not folder:
            raise UsageError(f"--policy {spec!r}: write NAME=DIR, e.g. --policy sft=runs/sft")
        if name in policies:
            raise UsageError(f"--policy {name}= is given twice; give each policy its own name")
        if not Path(folder).is_dir():
            raise UsageError(f"--policy {name}={folder}: no such folder; pass a saved policy")
        policies[name] = Path(folder)
    if not policies:
        raise UsageError("no --policy given; pass --policy NAME=DIR once per policy")
    return policies


def run_folder(path: str | Path) -> Path:
    """A reward model's run directory, whether given as the run or as its model/ folder."""
    folder = Path(path).resolve()
    return folder.parent if folder.name == "model" else folder


def recorded_reward_models(policy_dir: Path) -> list[tuple[str, Path]]:
    """(reward model, settings file) for every reward model the policy's run records having
    trained against (PPO's settings.json beside policy/ says `reward_model`)."""
    found = []
    for folder in (policy_dir, policy_dir.parent):
        for name in SETTINGS_FILES:
            path = folder / name
            if path.is_file():
                found += [(value, path) for value in _values_of(json.loads(path.read_text()))]
    return found


def _values_of(record, key: str = "reward_model") -> list[str]:
    """Every string under `key` in a settings record, at any depth (its inputs' settings too)."""
    if isinstance(record, dict):
        own = [record[key]] if isinstance(record.get(key), str) else []
        return own + [v for value in record.values() for v in _values_of(value, key)]
    if isinstance(record, list):
        return [v for value in record for v in _values_of(value, key)]
    return []


def refuse_trained_against_judge(policies: dict[str, Path], judge: str) -> None:
    """Raise UsageError when a policy's provenance says it was optimised against the judge:
    its score would measure how well it fooled that model, not how good it is."""
    for name, folder in policies.items():
        for reward_model, settings in recorded_reward_models(folder):
            if run_folder(reward_model) == run_folder(judge):
                raise UsageError(
                    f"--policy {name}={folder} was trained against the reward model "
                    f"{reward_model} ({settings}), which is --judge; pass a judge trained apart "
                    "(other seed or data)"
                )


# ---- preference: the judge's scores per family, win rates, KL, length ----------------------


@torch.no_grad()
def answer(model, tokenizer, folder: Path, rows: list[dict], args: Args):
    """The policy's replies to `rows`' prompts: the rollouts (for the KL) and the texts, sampled
    from the seed every policy shares (common random numbers)."""
    chat = policy_chat(str(folder), tokenizer)
    queries = encode_queries(tokenizer, rows, chat, args.query_length)
    stop_id = end_of_turn_id(tokenizer, chat)
    generator = torch.Generator().manual_seed(args.seed + 7919)
    batches = [
        rollout(
            model,
            queries[s : s + args.batch_size],
            args,
            tokenizer.pad_token_id,
            stop_id,
            generator,
            "cpu",
        )
        for s in range(0, len(queries), args.batch_size)
    ]
    return batches, [reply_content(text) for text in reply_texts(batches, tokenizer)]


def per_family(rows: list[dict], values: torch.Tensor) -> dict:
    """mean_with_ci over all rows (`all`) and over each family's rows."""
    result = {"all": mean_with_ci(values)}
    for family in sorted({row["family"] for row in rows}):
        inside = torch.tensor([row["family"] == family for row in rows])
        result[family] = mean_with_ci(values[inside])
    return result


def preference(policies: dict[str, Path], rows: list[dict], args: Args, reference: str) -> tuple:
    """({name: scores, reply lengths, KL to the reference}, {name: {other: win rates}}).

    Models are loaded one at a time beside the reference, so memory holds two at most."""
    judge = make_judge(args.judge, args.batch_size)
    ref_tokenizer = models.load_tokenizer(str(policies[reference]))
    ref_model = models.load_causal_lm(str(policies[reference]), ref_tokenizer).eval()
    results, scores = {}, {}
    for name, folder in policies.items():
        tokenizer = models.load_tokenizer(str(folder))
        model = models.load_causal_lm(str(folder), tokenizer).eval()
        run.disable_dropout(model)
        batches, texts = answer(model, tokenizer, folder, rows, args)
        scores[name] = judge(rows, texts)
        tokens = torch.cat([batch.response_mask.sum(1).float() for batch in batches])
        kl = None  # the KL needs both models' probabilities of the same tokens
        if tokenizer.get_vocab() == ref_tokenizer.get_vocab():
            kl = held_out_kl(model, ref_model, batches, args.temperature).mean().item()
        results[name] = {
            "folder": str(folder),
            "score": per_family(rows, scores[name]),
            "reply_tokens": per_family(rows, tokens),
            "reply_words": per_family(rows, torch.tensor([float(len(t.split())) for t in texts])),
            "kl_to_reference": kl,
            "samples": [
                {"prompt": row["prompt"][-1]["content"], "reply": text, "score": score}
                for row, text, score in zip(rows[:3], texts, scores[name].tolist())
            ],
        }
    win_rates = {
        mine: {
            theirs: _win_rates(verdict(rows, scores[mine], scores[theirs]))
            for theirs in policies
            if theirs != mine
        }
        for mine in policies
    }
    return results, win_rates


def _win_rates(verdict_: dict) -> dict:
    """{"all": rate, family: rate, ...} from ppo_eval.verdict."""
    return {
        "all": verdict_["win_rate"],
        **{family: part["win_rate"] for family, part in verdict_["by_family"].items()},
    }


# ---- capability: lm_eval, zero-shot ---------------------------------------------------------


def task_specs(tasks: str) -> tuple[list[str], list[dict]]:
    """(lm_eval task names, task configs read from YAML paths with their data files made
    absolute), so a local task is found wherever the command runs."""
    names, configs = [], []
    for item in (part.strip() for part in tasks.split(",")):
        if not item:
            continue
        path = Path(item)
        if not path.exists():
            names.append(item)
            continue
        files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
        if not files:
            raise UsageError(f"--tasks {item}: a folder without a task .yaml file")
        configs += [local_task(file) for file in files]
    return names, configs


def local_task(path: Path) -> dict:
    """A task YAML as lm_eval's config dict, its `dataset_kwargs.data_files` resolved against
    the YAML's folder."""
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or "task" not in config:
        raise UsageError(f"{path}: not an lm_eval task file (no `task:` key)")
    data_files = config.get("dataset_kwargs", {}).get("data_files")
    if isinstance(data_files, str):
        data_files = {"test": data_files}
    if data_files:
        config["dataset_kwargs"]["data_files"] = {
            split: str((path.parent / file).resolve()) for split, file in data_files.items()
        }
    return config


def task_manager(names: list[str]):
    """lm_eval's TaskManager, after checking that every task name is one it knows (before any
    model is loaded). Indexing lm_eval's own task folders takes seconds; local task files need
    none of it."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError(
            "--tasks needs lm-evaluation-harness: pip install 'hhdata[eval]'"
        ) from None
    manager = TaskManager(include_defaults=bool(names))
    unknown = sorted(set(names) - set(manager.match_tasks(names)))
    if unknown:
        raise UsageError(
            f"--tasks {','.join(unknown)}: neither an lm_eval task name nor a file; pass names "
            "that `lm_eval ls tasks` lists, or the path of a task YAML file or folder"
        )
    return manager


def capability(
    policies: dict[str, Path], names: list[str], configs: list[dict], manager, args: Args
) -> dict:
    """{policy: {task: {"acc", "stderr"}}}: each policy through lm_eval.simple_evaluate with
    an HFLM around the loaded model, zero-shot, on the tasks `names` and `configs`
    (task_specs)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for name, folder in policies.items():
        tokenizer = models.load_tokenizer(str(folder))
        model = models.load_causal_lm(str(folder), tokenizer).eval()
        harness_model = HFLM(
            pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device=device
        )
        output = lm_eval.simple_evaluate(
            model=harness_model,
            tasks=names + copy.deepcopy(configs),  # lm_eval edits the configs it reads
            num_fewshot=0,
            limit=args.limit,
            task_manager=manager,
            log_samples=False,
            random_seed=args.seed,
            numpy_random_seed=args.seed,
            torch_random_seed=args.seed,
        )
        results[name] = {
            task: {"acc": values["acc,none"], "stderr": values.get("acc_stderr,none")}
            for task, values in output["results"].items()
            if "acc,none" in values
        }
    return results


def alignment_tax(capabilities: dict, base: str) -> None:
    """Add `vs_base` (accuracy minus the base policy's: negative is an alignment tax, positive
    a bonus) to every policy's task results."""
    for tasks in capabilities.values():
        for task, result in tasks.items():
            result["vs_base"] = result["acc"] - capabilities[base][task]["acc"]


# ---- reports: the table, the plot, the cards ------------------------------------------------


def _cell(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['ci95']:.3f}"


def tables(evaluation: dict) -> str:
    """The markdown tables of evaluation.json: preference, win rates, capability."""
    families = evaluation["families"]
    parts = ["all", *families]
    reference, base = evaluation["reference"], evaluation["base"]
    lines = [
        f"Judge: `{evaluation['judge']}` on {evaluation['prompts']['all']} held-out prompts ("
        + ", ".join(f"{f}: {evaluation['prompts'][f]}" for f in families)
        + f"); KL to `{reference}` in nats per reply; 95% confidence intervals.",
        "",
        "| policy | "
        + " | ".join(f"judge score: {p}" for p in parts)
        + f" | KL to {reference} | "
        + " | ".join(f"reply tokens: {p}" for p in parts)
        + " |",
        "|---|" + "---|" * (2 * len(parts) + 1),
    ]
    for name, result in evaluation["policies"].items():
        kl = result["kl_to_reference"]
        lines.append(
            f"| {name} | "
            + " | ".join(_cell(result["score"][p]) for p in parts)
            + f" | {'n/a' if kl is None else f'{kl:.3f}'} | "
            + " | ".join(f"{result['reply_tokens'][p]['mean']:.1f}" for p in parts)
            + " |"
        )
    lines += [
        "",
        "| policy | against | " + " | ".join(f"win rate: {p}" for p in parts) + " |",
        "|---|---|" + "---|" * len(parts),
    ]
    for mine, others in evaluation["win_rates"].items():
        for theirs, rates in others.items():
            cells = " | ".join(f"{rates[p]:.3f}" for p in parts)
            lines.append(f"| {mine} | {theirs} | {cells} |")
    capabilities = evaluation["capability"]
    if capabilities:
        tasks = list(next(iter(capabilities.values())))
        lines += [
            "",
            "| policy | " + " | ".join(f"{t}: accuracy | {t}: Δ vs {base}" for t in tasks) + " |",
            "|---|" + "---|" * (2 * len(tasks)),
        ]
        for name, results in capabilities.items():
            cells = []
            for task in tasks:
                result = results[task]
                stderr = result["stderr"]
                spread = "" if stderr is None else f" ± {stderr:.3f}"
                cells += [f"{result['acc']:.3f}{spread}", f"{result['vs_base']:+.3f}"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Zero-shot accuracy ± standard error (lm_eval); Δ vs {base} is the accuracy minus "
            f"{base}'s: negative is an alignment tax, positive a bonus.",
        ]
    return "\n".join(lines) + "\n"


def save_plot(path: Path, evaluation: dict) -> None:
    """Judge score per family with its CI, per policy; accuracy per task beside it."""
    import numpy as np

    capabilities = evaluation["capability"]
    panels = 2 if capabilities else 1
    names = list(evaluation["policies"])
    with run.plot(path, 1, panels, size=(6 * panels, 4)) as axes:
        axes = np.atleast_1d(axes)
        parts = ["all", *evaluation["families"]]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            stats = [evaluation["policies"][name]["score"][p] for p in parts]
            axes[0].bar(
                np.arange(len(parts)) + i * width,
                [s["mean"] for s in stats],
                width,
                yerr=[s["ci95"] for s in stats],
                capsize=3,
                label=name,
            )
        axes[0].set_xticks(np.arange(len(parts)) + width * (len(names) - 1) / 2, parts)
        axes[0].set(ylabel="judge score", title="preference (judge), 95% CI")
        axes[0].legend(fontsize=7)
        if capabilities:
            tasks = list(next(iter(capabilities.values())))
            for i, name in enumerate(names):
                results = [capabilities[name][t] for t in tasks]
                axes[1].bar(
                    np.arange(len(tasks)) + i * width,
                    [r["acc"] for r in results],
                    width,
                    yerr=[r["stderr"] or 0.0 for r in results],
                    capsize=3,
                    label=name,
                )
            axes[1].set_xticks(np.arange(len(tasks)) + width * (len(names) - 1) / 2, tasks)
            axes[1].set(ylabel="accuracy (zero-shot)", title="capability (lm_eval), ± stderr")


def card_section(name: str, evaluation: dict) -> str:
    """The marked section of a policy's card: the tables, naming this policy."""
    return (
        f"{CARD_START}\n## Evaluation (training.evaluate)\n\n"
        f"This policy is `{name}` in the tables below.\n\n{tables(evaluation)}{CARD_END}\n"
    )


def update_card(readme: Path, section: str) -> None:
    """Put `section` into `readme`: in place of the previous one, else at the end.

    Idempotent: the same section twice leaves the file as once; the rest is never touched.
    """
    text = readme.read_text() if readme.is_file() else ""
    marked = re.compile(re.escape(CARD_START) + r".*?" + re.escape(CARD_END) + r"\n?", re.S)
    if marked.search(text):
        text = marked.sub(lambda _: section, text, count=1)
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    readme.write_text(text)


def main(args: Args) -> dict:
    """Evaluate the policies; returns what evaluation.json holds."""
    policies = parse_policies(args.policy)
    reference = args.reference or ("sft" if "sft" in policies else next(iter(policies)))
    base = args.base or ("base" if "base" in policies else next(iter(policies)))
    for flag, name in (("--reference", reference), ("--base", base)):
        if name not in policies:
            raise UsageError(f"{flag} {name}: no such --policy; pick one of {list(policies)}")
    if args.judge is None:
        raise UsageError("no --judge given; pass a reward-model run none of the policies used")
    refuse_trained_against_judge(policies, args.judge)
    names, configs = task_specs(args.tasks)
    manager = task_manager(names) if names or configs else None
    torch.manual_seed(args.seed)

    # 1. the held-out prompts: never trained on by the judge (when its settings.json says)
    rows, unknown, provenance = prompts_unseen_by(
        args.data, args.split, args.judge, "the judge", args.prompts, args.seed
    )
    families = sorted({row["family"] for row in rows})

    # 2. preference under the judge, 3. capability through lm_eval
    results, win_rates = preference(policies, rows, args, reference)
    capabilities = capability(policies, names, configs, manager, args) if manager else {}
    if capabilities:
        alignment_tax(capabilities, base)

    evaluation = {
        "judge": args.judge,
        "reference": reference,
        "base": base,
        "families": families,
        "prompts": {
            "all": len(rows),
            **{f: sum(row["family"] == f for row in rows) for f in families},
        },
        "judge_training_prompts_unknown": bool(unknown),
        "policies": results,
        "win_rates": win_rates,
        "capability": capabilities,
        "settings": run.settings_record(args, data=provenance),
    }
    out = Path(args.out)
    run.write_json(out / "evaluation.json", evaluation)
    (out / "evaluation.md").write_text(tables(evaluation))
    save_plot(out / "evaluation.png", evaluation)
    if args.cards:
        for name, folder in policies.items():
            update_card(folder / "README.md", card_section(name, evaluation))
    print(tables(evaluation))
    return evaluation


if __name__ == "__main__":
    run_cli(main, Args)
