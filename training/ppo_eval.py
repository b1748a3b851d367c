"""PPO's held-out judgement and reports: which prompts are held out, the policy's replies to
them against the reference's (win rate under the proxy reward model and an independent
judge), the reward-vs-sqrt(KL) curve, plots, the policy's model card and the printed summary.

Held-out prompts are never trained on by PPO nor by the reward models (proxy and judge), so
the win rate is measured honestly (Gao et al. 2022 on over-optimising a proxy).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from training import run
from training.common import UsageError, choose_split, load_pairs, prompt_key
from training.fast import reply_logprobs
from training.reward_model import load_reward_model, split_held_out
from training.reward_model import score as text_scores
from training.rollout import Rollout, rollout


def reward_model_training_prompts(
    run_dir: str | None, splits: dict, provenance: dict
) -> set[tuple] | None:
    """The prompts a reward-model run trained on, rebuilt from its settings.json (None: unknown).

    The run's own rule picks its rows (reward_model.split_held_out, the family filter and
    --max-train-pairs), on the run's own data, or on PPO's when both name the same source.
    """
    settings_path = Path(run_dir) / "settings.json" if run_dir else None
    if settings_path is None or not settings_path.is_file():
        return None
    settings = json.loads(settings_path.read_text())
    rm_args = settings["args"]
    same = settings.get("provenance") == provenance
    rm_splits = splits if same else load_pairs(rm_args.get("data"), rm_args.get("version"))[0]
    rows, _ = split_held_out(rm_splits, rm_args.get("eval_fraction", 0.2))
    rows = [row for row in rows if rm_args.get("train_config", "all") in ("all", row["family"])]
    return {prompt_key(row) for row in rows[: rm_args.get("max_train_pairs")]}


def split_prompts(
    splits: dict, train_split: str, excluded: set[tuple], count: int, seed: int
) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): `count` held-out rows with distinct prompts, none in
    `excluded`
    (the reward models' training prompts); PPO trains on the rest of `train_split`, never on a
    held-out prompt. Rows of other splits are held out first, then rows of `train_split`.
    """
    generator = torch.Generator().manual_seed(seed)

    def shuffled(rows: list[dict]) -> list[dict]:
        return [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]

    others = [row for name, rows in sorted(splits.items()) if name != train_split for row in rows]
    held_out, chosen = [], set()
    for row in shuffled(others) + shuffled(splits[train_split]):
        key = prompt_key(row)
        if len(held_out) == count:
            break
        if key not in excluded and key not in chosen:
            held_out.append(row)
            chosen.add(key)
    return [row for row in splits[train_split] if prompt_key(row) not in chosen], held_out


def held_out_prompts(
    splits: dict, train_split: str, provenance: dict, rated_by: tuple, count: int, seed: int
) -> tuple[list[dict], list[dict], list[str], list[str]]:
    """(training rows, held-out rows, the reward-model runs whose training prompts are left out
    of the held-out ones, the runs whose training prompts are unknown): split_prompts, excluding
    every prompt the reward models `rated_by` (proxy and judge run directories) trained on."""
    excluded, known, unknown = set(), [], []
    for run_dir in rated_by:
        prompts = reward_model_training_prompts(run_dir, splits, provenance)
        (unknown if prompts is None else known).append(run_dir)
        excluded |= prompts or set()
    train_rows, eval_rows = split_prompts(splits, train_split, excluded, count, seed)
    return train_rows, eval_rows, known, unknown


def prompts_unseen_by(
    data: str | None, split: str | None, run_dir: str, who: str, count: int, seed: int
) -> tuple[list[dict], list[str], dict]:
    """(`count` held-out rows with distinct prompts that the reward model in `run_dir` never
    trained on, [run_dir] when its training prompts are unknown, the data's provenance): the
    prompts best-of-N and the evaluation score with that model. Refuses data it saw whole."""
    splits, provenance = load_pairs(data)
    train_split = choose_split(splits, split, provenance["source"])
    _, rows, _, unknown = held_out_prompts(splits, train_split, provenance, (run_dir,), count, seed)
    if not rows:
        raise UsageError(
            f"{provenance['source']}: every prompt was trained on by {who}; pass other --data"
        )
    return rows, unknown, provenance


@torch.no_grad()
def held_out_rollouts(model, queries, args, pad_id: int, stop_id: int, device) -> list[Rollout]:
    """Replies to the held-out queries, sampled from one fixed seed, so the policy at every
    saved update and the reference meet the same random numbers (common random numbers)."""
    generator = torch.Generator(device).manual_seed(args.seed + 7919)
    return [
        rollout(model, queries[s : s + args.batch_size], args, pad_id, stop_id, generator, device)
        for s in range(0, len(queries), args.batch_size)
    ]


def reply_texts(batches: list[Rollout], tokenizer) -> list[str]:
    """The replies' words, up to their end-of-turn token, as a judge reads them."""
    return [
        tokenizer.decode(reply[keep], skip_special_tokens=True)
        for batch in batches
        for reply, keep in zip(batch.responses.cpu(), batch.response_mask.cpu())
    ]


def make_judge(run_dir: str, batch_size: int):
    """judge(rows, texts) -> scores [n] of a separately trained reward model, which reads the
    replies' text in exactly the format it was trained on (reward_model.score encodes it)."""
    model, tokenizer, settings = load_reward_model(run_dir)
    run.disable_dropout(model)

    def judge(rows: list[dict], texts: list[str]) -> torch.Tensor:
        replies = [[{"role": "assistant", "content": text}] for text in texts]
        return torch.cat(
            [
                text_scores(
                    model,
                    tokenizer,
                    settings,
                    [row["prompt"] for row in rows[s : s + batch_size]],
                    replies[s : s + batch_size],
                )
                for s in range(0, len(rows), batch_size)
            ]
        ).float()

    return judge


@torch.no_grad()
def held_out_kl(policy, reference, batches: list[Rollout], temperature: float) -> torch.Tensor:
    """KL of the policy to the reference on its held-out replies, in nats per reply, shape [n]."""
    parts = []
    for batch in batches:
        mine, _ = reply_logprobs(policy, batch.ids, batch.at, batch.responses, temperature)
        theirs, _ = reply_logprobs(reference, batch.ids, batch.at, batch.responses, temperature)
        parts.append(((mine - theirs) * batch.response_mask).sum(1).cpu())
    return torch.cat(parts)


def held_out_point(
    update: int,
    policy,
    reference,
    score,
    judge,
    rows,
    queries,
    args,
    pad_id,
    stop_id,
    tokenizer,
    device,
) -> dict:
    """One point of the held-out reward-vs-sqrt(KL) curve: the policy's mean proxy (and judge)
    score and its KL to the reference on the held-out prompts."""
    batches = held_out_rollouts(policy, queries, args, pad_id, stop_id, device)
    kl = held_out_kl(policy, reference, batches, args.temperature).mean().item()
    point = {
        "update": update,
        "kl": kl,
        "sqrt_kl": math.sqrt(max(kl, 0.0)),
        "score": torch.cat([score(batch).cpu() for batch in batches]).mean().item(),
    }
    if judge is not None:
        point["judge_score"] = judge(rows, reply_texts(batches, tokenizer)).mean().item()
    return point


def verdict(rows: list[dict], mine: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Win rate of `mine` over `theirs` (a tie counts half) and mean scores, overall and per
    family."""
    wins = (mine > theirs).float() + 0.5 * (mine == theirs).float()
    result = {
        "prompts": len(rows),
        "win_rate": wins.mean().item(),
        "policy_score": mine.mean().item(),
        "reference_score": theirs.mean().item(),
        "by_family": {},
    }
    for family in sorted({row["family"] for row in rows}):
        inside = torch.tensor([row["family"] == family for row in rows])
        result["by_family"][family] = {
            "prompts": int(inside.sum()),
            "win_rate": wins[inside].mean().item(),
            "policy_score": mine[inside].mean().item(),
            "reference_score": theirs[inside].mean().item(),
        }
    return result


@torch.no_grad()
def evaluate(
    policy, reference, score, judge, rows, queries, args, pad_id, stop_id, tokenizer, device
) -> dict:
    """Held-out replies of the policy and of the reference on the same prompts, judged by the proxy
    reward model PPO optimised and, when given, by a judge it never saw.

    The proxy's verdict is the top level (and `proxy`); the judge's is under `judge`. A policy
    that wins under the proxy but not under the judge has learned the proxy's mistakes (reward
    hacking, Gao et al. 2022).
    """
    replies = {
        name: held_out_rollouts(model, queries, args, pad_id, stop_id, device)
        for name, model in (("policy", policy), ("reference", reference))
    }
    texts = {name: reply_texts(batches, tokenizer) for name, batches in replies.items()}
    proxy = {
        name: torch.cat([score(batch).cpu() for batch in batches])
        for name, batches in replies.items()
    }
    result = verdict(rows, proxy["policy"], proxy["reference"])
    result["proxy"] = {key: value for key, value in result.items()}
    judged = None
    if judge is not None:
        judged = {name: judge(rows, texts[name]) for name in replies}
        result["judge"] = verdict(rows, judged["policy"], judged["reference"])
    result["samples"] = [
        {
            "prompt": row["prompt"][-1]["content"],
            "reference": texts["reference"][i],
            "reference_score": proxy["reference"][i].item(),
            "policy": texts["policy"][i],
            "policy_score": proxy["policy"][i].item(),
            **(
                {
                    "reference_judge": judged["reference"][i].item(),
                    "policy_judge": judged["policy"][i].item(),
                }
                if judged
                else {}
            ),
        }
        for i, row in enumerate(rows[: args.num_samples_shown])
    ]
    return result


CURVES = (
    "score",
    "kl",
    "sqrt_kl",
    "entropy",
    "reply_length",
    "pg_clipfrac",
    "vf_clipfrac",
    "value_loss",
)


def save_plots(output_dir: Path, history: list[dict], held_out: list[dict]) -> None:
    """training.png (a curve per metric) and reward_vs_sqrt_kl.png: the score against sqrt(KL),
    per training batch and on the held-out prompts at each saved update (proxy and judge), each
    with its linear fit."""
    import numpy as np

    updates = [record["update"] for record in history]
    with run.plot(output_dir / "training.png", 2, 4, size=(14, 6)) as axes:
        for axis, name in zip(axes.flat, CURVES):
            axis.plot(updates, [record[name] for record in history])
            axis.set(title=name, xlabel="update")
    # Bai et al. 2022 (fig. 4): the reward-model score grows roughly linearly in sqrt(KL)
    series = [
        ("training batches (proxy)", history, "score", "o"),
        ("held-out (proxy)", held_out, "score", "s"),
    ]
    if held_out and "judge_score" in held_out[0]:
        series.append(("held-out (judge)", held_out, "judge_score", "^"))
    with run.plot(output_dir / "reward_vs_sqrt_kl.png", size=(6, 4.5)) as axis:
        for label, points, name, marker in series:
            x = np.array([point["sqrt_kl"] for point in points])
            line = axis.scatter(x, [point[name] for point in points], marker=marker, label=label)
            fit = sqrt_kl_fit(points, name)
            if fit is not None:
                axis.plot(
                    x,
                    fit["slope"] * x + fit["intercept"],
                    "--",
                    color=line.get_facecolor()[0],
                    label=f"fit: {fit['slope']:.3f} sqrt(KL) + {fit['intercept']:.3f}",
                )
        axis.set(
            xlabel="sqrt(KL to the reference) (sqrt nats)",
            ylabel="reward-model score",
            title="reward vs sqrt(KL)",
        )
        axis.legend(fontsize=7)


def sqrt_kl_fit(points: list[dict], name: str = "score") -> dict | None:
    """Least-squares line points[name] = slope * sqrt(KL) + intercept (Bai et al. 2022, fig. 4).

    >>> sqrt_kl_fit([{"sqrt_kl": 0.0, "score": 1.0}, {"sqrt_kl": 2.0, "score": 2.0}])
    {'slope': 0.5, 'intercept': 1.0}
    """
    import numpy as np

    x = np.array([point["sqrt_kl"] for point in points])
    y = np.array([point[name] for point in points])
    if len(points) < 2 or np.ptp(x) == 0:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    return {"slope": round(float(slope), 12), "intercept": round(float(intercept), 12)}


def verdict_rows(name: str, verdict_: dict) -> list[str]:
    """Table rows of one judge's verdict: overall, then per family."""
    return [
        f"| {name} | {part_name} | {part['prompts']} | {part['win_rate']:.3f} | "
        f"{part['policy_score']:.3f} | {part['reference_score']:.3f} |"
        for part_name, part in [("all", verdict_)] + list(verdict_["by_family"].items())
    ]


def write_card(folder: Path, settings: dict, evaluation: dict) -> None:
    """README.md of the final policy from hhdata/cards/policy_card.md."""
    rows = [
        "| judged by | prompts | n | win rate vs reference | policy score | reference score |",
        "|---|---|---|---|---|---|",
    ]
    rows += verdict_rows("proxy (optimised)", evaluation["proxy"])
    if "judge" in evaluation:
        rows += verdict_rows("judge (never optimised)", evaluation["judge"])
    samples = "\n\n".join(
        f"**Prompt:** {s['prompt']!r}\n\n"
        f"- reference ({s['reference_score']:.2f}): {s['reference']!r}\n"
        f"- policy ({s['policy_score']:.2f}): {s['policy']!r}"
        for s in evaluation["samples"]
    )
    args = settings["args"]
    run.write_card(
        folder / "README.md",
        "policy_card.md",
        policy=args["policy"],
        reward_model=args["reward_model"],
        judge=args["judge"] or "none (pass --judge)",
        data=json.dumps(settings["data"]),
        split=settings["split"],
        held_out=settings["held_out_prompts"],
        episodes=args["total_episodes"],
        updates=settings["updates"],
        eval_table="\n".join(rows),
        samples=samples,
        settings=json.dumps(args, indent=2),
    )


def summary(evaluation: dict, history: list[dict]) -> str:
    """The printed end of a run: training's course, win rates (proxy, judge) overall and per family,
    replies side by side."""
    first, last = history[0], history[-1]
    lines = [
        f"ppo: {last['update']} updates, {last['episodes']} episodes; batch score "
        f"{first['score']:.3f} -> {last['score']:.3f} "
        f"at KL {last['kl']:.2f} nats per reply to the reference"
    ]
    for name, part in (
        ("proxy reward model (optimised)", evaluation["proxy"]),
        ("judge reward model (never optimised)", evaluation.get("judge")),
    ):
        if part is None:
            continue
        lines.append(
            f"held-out, judged by the {name}: policy wins {part['win_rate']:.1%} of "
            f"{part['prompts']} prompts "
            f"against the reference (score {part['policy_score']:.3f} vs "
            f"{part['reference_score']:.3f})"
        )
        for family, share in part["by_family"].items():
            lines.append(
                f"  {family}: win rate {share['win_rate']:.1%} over {share['prompts']} prompts, "
                f"score {share['policy_score']:.3f} vs {share['reference_score']:.3f}"
            )
    if (
        "judge" in evaluation
        and evaluation["proxy"]["win_rate"] > 0.5 >= evaluation["judge"]["win_rate"]
    ):
        lines.append(
            "the proxy prefers the policy but the judge does not: the policy learned the proxy's "
            "mistakes (reward hacking)"
        )
    for sample in evaluation["samples"]:
        lines += [
            f"\nprompt:    {sample['prompt'][:200]!r}",
            f"reference: {sample['reference'][:200]!r} ({sample['reference_score']:.2f})",
            f"policy:    {sample['policy'][:200]!r} ({sample['policy_score']:.2f})",
        ]
    return "\n".join(lines)
