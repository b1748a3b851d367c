"""Best-of-N (rejection sampling): sample N replies per prompt, score them with a reward
model, keep the best.

Bai et al. 2022 made the ``helpful-rejection-sampled`` subset this way, and best-of-N is
the baseline any RL method has to beat at equal KL (Stiennon et al. 2020; Gao et al. 2022).
This command gives it two ways:

(a) as a policy: the mean reward of the best of the first n samples for each n of ``--n``,
    beside the analytic KL of best-of-n to the sampling policy, log n - (n - 1) / n
    (Stiennon et al. 2020; the formula is exact without ties), and beside
    PPO's held-out reward vs KL when ``--ppo-run`` names a PPO run;
(b) as data: one comparison per prompt, the best reply against the worst (or a random
    worse one), in raw HH JSONL with a provenance sidecar, ready for ``hhdata build``.

The N replies of a prompt share its forward pass: the prompt's key-value cache is computed
once and repeated N times (training.fast.sample, ``copies=N``). The samples are nested: the
best of n is the best of the first n of the same N samples, so the curve is monotone and
each point costs no extra sampling.

    python -m training.best_of_n --policy runs/sft --reward-model runs/reward-model --n 1,2,4,8,16
"""

from __future__ import annotations

import gzip
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from hhdata.pairs.transcript import render_transcript, split_pair
from training import models, run, vllm_generation
from training.common import UsageError, run_cli
from training.fast import sample
from training.ppo_eval import make_judge, prompts_unseen_by
from training.rollout import fit_query, left_pad, start_length, truncate_at_stop
from training.text import encode_prompt, end_of_turn_id, uses_chat_template


@dataclass(frozen=True)
class Args(vllm_generation.GeneratorArgs):
    """Best-of-N: sample N replies per prompt, keep the reward model's favourite."""

    policy: str = "runs/sft"
    """the policy that samples (an SFT run directory, or any saved causal LM)"""
    reward_model: str = "runs/reward-model"
    """the reward-model run directory that picks the best reply"""
    data: str | None = None
    """a release directory, a .parquet of pair rows or a Hub repo id; default: the bundled sample"""
    split: str | None = None
    """the split whose prompts are used after the held-out ones; default `train` where the data
    has it, else its only split"""
    n: str = "1,2,4,8,16"
    """the values of N, comma-separated; the largest is how many replies each prompt gets"""
    prompts: int = 64
    """prompts answered (distinct, never trained on by the reward model when its settings say)"""
    query_length: int = 128
    """longest prompt in tokens; longer prompts keep their end (the latest turns)"""
    response_length: int = 32
    """most tokens sampled per reply"""
    temperature: float = 1.0
    """sampling temperature (1.0: the policy's own distribution, which the KL formula assumes)"""
    batch_size: int = 4
    """prompts per sampling batch (each with max(N) replies)"""
    share_prompt: bool = True
    """run each prompt once and repeat its key-value cache for its N replies (the same samples
    as N copies of the prompt, which --no-share-prompt runs: the reference, and the benchmark's
    baseline)"""
    seed: int = 1
    """seed of the prompt choice and of the sampling"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """autocast precision of sampling and scoring (on the CPU, where this command runs its
    models; bf16 as the trainers' --precision bf16)"""
    ppo_run: str | None = None
    """a PPO output directory: its held-out reward vs KL goes beside best-of-N's"""
    rejected: Literal["worst", "random"] = "worst"
    """the reply the best is compared with in the written data: the worst of the N (the largest
    reward gap, the surest label), or a random worse one (harder pairs, noisier labels)"""
    subset: str | None = None
    """name of the written subset; default `<family>-best-of-<N>`"""
    data_split: Literal["train", "test"] = "train"
    """the split the written comparisons are filed under"""
    output_dir: str = "runs/best-of-n"
    """where best_of_n.json, best_of_n.md, reward_vs_kl.png and data/ go"""


def n_values(text: str) -> list[int]:
    """The sorted values of --n.

    >>> n_values("4,1,2")
    [1, 2, 4]
    """
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise UsageError(f"--n {text!r}: pass positive integers separated by commas, e.g. 1,2,4,8")
    return values


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || policy) in nats: log n - (n - 1) / n (Stiennon et al. 2020),
    exact for continuous rewards without ties, an upper bound otherwise.

    >>> best_of_n_kl(1), round(best_of_n_kl(4), 4)
    (0.0, 0.6363)
    """
    return math.log(n) - (n - 1) / n


def mean_with_ci(values: torch.Tensor) -> dict:
    """Mean, 95% normal confidence interval (1.96 standard errors) and count.

    >>> mean_with_ci(torch.tensor([1.0, 3.0]))
    {'mean': 2.0, 'ci95': 1.96, 'n': 2}
    """
    count = len(values)
    spread = values.std().item() if count > 1 else 0.0
    return {
        "mean": values.mean().item(),
        "ci95": round(1.96 * spread / math.sqrt(count), 4),
        "n": count,
    }


def policy_chat(policy_dir: str, tokenizer) -> bool:
    """Whether the policy reads chat-template text: what its SFT run recorded (args.json), else
    whether its tokenizer has a template."""
    recorded = Path(policy_dir) / "args.json"
    if recorded.is_file():
        return bool(json.loads(recorded.read_text()).get("chat_template", False))
    return uses_chat_template(tokenizer, True)


def encode_queries(tokenizer, rows: list[dict], chat: bool, query_length: int) -> list[list[int]]:
    """Each row's prompt as PPO queries it: the start token and its latest turns."""
    start = start_length(tokenizer, chat)
    return [
        fit_query(encode_prompt(tokenizer, row["prompt"], chat)[0], query_length, start)
        for row in rows
    ]


def reply_content(text: str) -> str:
    """A sampled reply's text as its turn's content: without the one space that separates it
    from the ``Assistant:`` tag (the query ends with the bare tag, so the reply starts with it),
    as hhdata.pairs.transcript splits a transcript.

    >>> reply_content(" Sure.")
    'Sure.'
    """
    return text.removeprefix(" ")


@torch.no_grad()
def sample_replies(
    model, tokenizer, queries, copies: int, args, stop_id: int, sampler=sample
) -> list[list[str]]:
    """`copies` replies to each query, as turn contents (up to the end-of-turn token), one list per
    query; the prompt's forward pass is shared by its replies (fast.sample, copies=) unless
    --no-share-prompt. `sampler` is fast.sample or a vLLM engine's ``sample``."""
    generator = torch.Generator().manual_seed(args.seed)
    texts: list[list[str]] = []
    for first in range(0, len(queries), args.batch_size):
        ids, mask = left_pad(queries[first : first + args.batch_size], tokenizer.pad_token_id)
        # shape: [batch * copies, response_length]; row i * copies + k is query i's k-th reply
        if args.share_prompt:
            tokens, _ = sampler(
                model, ids, mask, args.response_length, args.temperature, stop_id, generator, copies
            )
        else:
            ids, mask = ids.repeat_interleave(copies, 0), mask.repeat_interleave(copies, 0)
            tokens, _ = sampler(
                model, ids, mask, args.response_length, args.temperature, stop_id, generator
            )
        keep, _ = truncate_at_stop(tokens, stop_id)
        decoded = [
            reply_content(tokenizer.decode(reply[kept], skip_special_tokens=True))
            for reply, kept in zip(tokens, keep)
        ]
        texts += [decoded[i : i + copies] for i in range(0, len(decoded), copies)]
    return texts


def reward_curve(rows: list[dict], rewards: torch.Tensor, ns: list[int]) -> list[dict]:
    """For each n: the mean (with CI) over prompts of the best reward among the first n
    samples, overall and per family, and the analytic KL. `rewards` has shape [prompts, N].

    >>> rows = [{"family": "helpful"}, {"family": "harmless"}]
    >>> curve = reward_curve(rows, torch.tensor([[0.0, 2.0], [1.0, 0.0]]), [1, 2])
    >>> [point["reward"]["mean"] for point in curve]
    [0.5, 1.5]
    """
    families = sorted({row["family"] for row in rows})
    curve = []
    for n in ns:
        best = rewards[:, :n].max(1).values  # shape: [prompts]
        point = {"n": n, "kl": best_of_n_kl(n), "reward": mean_with_ci(best), "by_family": {}}
        for family in families:
            inside = torch.tensor([row["family"] == family for row in rows])
            point["by_family"][family] = mean_with_ci(best[inside])
        curve.append(point)
    return curve


def ppo_points(ppo_run: str | None, reward_model: str) -> dict | None:
    """A PPO run's held-out reward vs KL (its metrics.json), with the reward model that scored
    it: comparable with best-of-N's curve only when that is the same reward model."""
    if ppo_run is None:
        return None
    metrics_path, settings_path = Path(ppo_run) / "metrics.json", Path(ppo_run) / "settings.json"
    if not metrics_path.is_file():
        raise UsageError(f"--ppo-run {ppo_run}: no metrics.json; pass a finished PPO run directory")
    held_out = json.loads(metrics_path.read_text())["held_out"]
    scored_by = None
    if settings_path.is_file():
        scored_by = json.loads(settings_path.read_text())["args"].get("reward_model")
    same = scored_by is not None and Path(scored_by).resolve() == Path(reward_model).resolve()
    return {
        "run": ppo_run,
        "scored_by": scored_by,
        "same_reward_model": same,
        "points": [{"kl": p["kl"], "reward": p["score"]} for p in held_out],
    }


def round_trips(prompt: list[dict], reply: str) -> bool:
    """Whether prompt + reply written as an HH transcript parses back to the same turns: a
    sampled reply that writes a speaker tag would turn into another turn, an empty one is
    no comparison."""
    text = render_transcript(prompt + [{"role": "assistant", "content": reply}])
    try:
        pair = split_pair(text, text)
    except ValueError:
        return False
    return bool(reply.strip()) and pair.prompt == prompt and pair.chosen[0]["content"] == reply


def comparisons(rows, texts, rewards: torch.Tensor, rejected: str, seed: int) -> tuple[list, dict]:
    """One comparison per prompt: (prompt index, best sample, rejected sample), and how many
    prompts were skipped per reason. Rejected is the worst reply, or a random one scored
    strictly below the best; replies that do not round-trip through the transcript format are
    never picked."""
    generator = torch.Generator().manual_seed(seed)
    kept, skipped = [], {"no_reply_round_trips": 0, "no_worse_reply": 0}
    for index, (row, replies, scores) in enumerate(zip(rows, texts, rewards)):
        usable = [i for i, text in enumerate(replies) if round_trips(row["prompt"], text)]
        if not usable:
            skipped["no_reply_round_trips"] += 1
            continue
        best = max(usable, key=lambda i: scores[i].item())
        worse = [i for i in usable if scores[i] < scores[best] and replies[i] != replies[best]]
        if not worse:
            skipped["no_worse_reply"] += 1
            continue
        if rejected == "worst":
            other = min(worse, key=lambda i: scores[i].item())
        else:
            other = worse[torch.randint(len(worse), (1,), generator=generator).item()]
        kept.append((index, best, other))
    return kept, skipped


def write_comparisons(folder: Path, rows, texts, rewards, picked, provenance: dict) -> Path:
    """Raw HH JSONL (``{"chosen": ..., "rejected": ...}`` per line, gzip with a fixed mtime)
    at `folder`/<split>.jsonl.gz, and the provenance sidecar beside it: one JSON object per
    line, same order (the contract ``hhdata build`` reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    split = provenance["split"]
    lines, sidecar = [], []
    for index, best, other in picked:
        prompt = rows[index]["prompt"]
        record = {
            side: render_transcript(prompt + [{"role": "assistant", "content": texts[index][k]}])
            for side, k in (("chosen", best), ("rejected", other))
        }
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        sidecar.append(
            {
                **{k: v for k, v in provenance.items() if k != "split"},
                "prompt_source_id": rows[index]["id"],
                "chosen_sample": best,
                "rejected_sample": other,
                "chosen_reward": round(rewards[index, best].item(), 6),
                "rejected_reward": round(rewards[index, other].item(), 6),
            }
        )
    path = folder / f"{split}.jsonl.gz"
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        out.write("".join(lines).encode("utf-8"))
    (folder / f"{split}.provenance.json").write_text(json.dumps(sidecar, indent=1))
    return path


def save_plot(path: Path, curve: list[dict], ppo: dict | None) -> None:
    """Reward vs KL: best-of-N at the analytic KL, PPO's held-out points beside it."""
    with run.plot(path, size=(6, 4.5)) as axis:
        axis.errorbar(
            [p["kl"] for p in curve],
            [p["reward"]["mean"] for p in curve],
            yerr=[p["reward"]["ci95"] for p in curve],
            marker="o",
            capsize=3,
            label="best-of-N (KL = log N - (N-1)/N)",
        )
        for point in curve:
            axis.annotate(f"N={point['n']}", (point["kl"], point["reward"]["mean"]), fontsize=7)
        if ppo is not None:
            same = "" if ppo["same_reward_model"] else " (scored by another reward model)"
            axis.plot(
                [p["kl"] for p in ppo["points"]],
                [p["reward"] for p in ppo["points"]],
                "s--",
                label=f"PPO held-out{same}",
            )
        axis.set(xlabel="KL to the sampling policy (nats)", ylabel="reward", title="reward vs KL")
        axis.legend(fontsize=7)


def table(curve: list[dict], ppo: dict | None) -> str:
    """best_of_n.md: reward (95% CI) per N and family beside the KL."""
    families = list(curve[0]["by_family"])
    lines = [
        "| N | KL (nats) | reward | " + " | ".join(families) + " |",
        "|---|---|---|" + "---|" * len(families),
    ]
    for point in curve:
        cells = [point["by_family"][f] for f in families]
        lines.append(
            f"| {point['n']} | {point['kl']:.3f} | {point['reward']['mean']:.3f} ± "
            f"{point['reward']['ci95']:.3f} | "
            + " | ".join(f"{c['mean']:.3f} ± {c['ci95']:.3f}" for c in cells)
            + " |"
        )
    if ppo is not None:
        lines += ["", f"PPO held-out ({ppo['run']}, scored by {ppo['scored_by']}):", ""]
        lines += ["| KL (nats) | reward |", "|---|---|"]
        lines += [f"| {p['kl']:.3f} | {p['reward']:.3f} |" for p in ppo["points"]]
    return "\n".join(lines) + "\n"


def main(args: Args) -> dict:
    """Sample, score, report the reward vs N curve and write the comparisons; returns the
    report written to best_of_n.json."""
    vllm_generation.require(args.generator)
    ns = n_values(args.n)
    copies = ns[-1]
    output_dir = Path(args.output_dir)
    torch.manual_seed(args.seed)

    # 1. prompts the reward model never trained on (when its settings.json says which it did)
    rows, unknown, provenance = prompts_unseen_by(
        args.data, args.split, args.reward_model, args.reward_model, args.prompts, args.seed
    )
    families = sorted({row["family"] for row in rows})
    if args.subset and len(families) > 1:
        raise UsageError(
            f"--subset {args.subset}: the prompts hold families {families}, and a subset has "
            "one; leave out --subset (one `<family>-best-of-N` subset each) or pass --data with "
            "one family's prompts"
        )

    # 2. N replies per prompt from one shared prompt pass, cut at the end-of-turn token
    tokenizer = models.load_tokenizer(args.policy)
    policy = models.load_causal_lm(args.policy, tokenizer).eval()
    run.disable_dropout(policy)
    chat = policy_chat(args.policy, tokenizer)
    queries = encode_queries(tokenizer, rows, chat, args.query_length)
    sampler = sample
    if args.generator == "vllm":  # the N replies of a prompt share its prefix in vLLM's cache
        engine = vllm_generation.engine(
            args.policy, args, args.query_length + args.response_length, args.seed
        )
        engine.sync_weights(policy)  # the engine may hold another run's weights
        sampler = engine.sample
    started, started_cpu = time.perf_counter(), time.process_time()
    stop_id = end_of_turn_id(tokenizer, chat)
    with models.cpu_autocast(args.precision):
        texts = sample_replies(policy, tokenizer, queries, copies, args, stop_id, sampler)
    sampling = {  # the part --share-prompt speeds up (bench/best_of_n.md)
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - started_cpu,
    }

    # 3. every reply scored by the reward model, reading the text as it was trained to
    judge = make_judge(args.reward_model, args.batch_size * copies)
    flat_rows = [row for row in rows for _ in range(copies)]
    with models.cpu_autocast(args.precision):
        flat_texts = [text for replies in texts for text in replies]
        rewards = judge(flat_rows, flat_texts).view(len(rows), copies)

    # 4. (a) best-of-n as a policy: reward vs N, at the analytic KL; PPO's curve beside it
    curve = reward_curve(rows, rewards, ns)
    ppo = ppo_points(args.ppo_run, args.reward_model)

    # 5. (b) best-of-N as data: the best reply against the worst (or a random worse) one,
    # one subset per family (a subset has one family)
    picked, skipped = comparisons(rows, texts, rewards, args.rejected, args.seed)
    written = []
    for family in families:
        mine = [pick for pick in picked if rows[pick[0]]["family"] == family]
        subset = args.subset or f"{family}-best-of-{copies}"
        path = None
        if mine:
            path = write_comparisons(
                output_dir / "data" / subset,
                rows,
                texts,
                rewards,
                mine,
                {
                    "split": args.data_split,
                    "method": f"best-of-{copies}",
                    "family": family,
                    "rejected": args.rejected,
                    "policy": args.policy,
                    "reward_model": args.reward_model,
                    "seed": args.seed,
                    "temperature": args.temperature,
                },
            )
        written.append(
            {
                "subset": subset,
                "family": family,
                "path": path and str(path),
                "comparisons": len(mine),
            }
        )

    report = {
        "curve": curve,
        "ppo": ppo,
        "prompts": len(rows),
        "samples_per_prompt": copies,
        "sampling": sampling,
        "prompt_ids": [row["id"] for row in rows],
        "replies": texts,  # shape: [prompts, N], as the reward model read them
        "rewards": rewards.tolist(),  # shape: [prompts, N]: the curve is recomputable from it
        "data": written,
        "skipped": skipped,
        "settings": run.settings_record(
            args, data=provenance, chat_template=chat, reward_model_prompts_unknown=bool(unknown)
        ),
    }
    run.write_json(output_dir / "best_of_n.json", report)
    (output_dir / "best_of_n.md").write_text(table(curve, ppo))
    save_plot(output_dir / "reward_vs_kl.png", curve, ppo)
    print(table(curve, ppo))
    print(
        f"best-of-n: {len(picked)} comparisons ({args.rejected} as rejected) written to "
        f"{[part['path'] for part in written]}; skipped {skipped}; sampling took "
        f"{sampling['seconds']:.1f} s ({sampling['cpu_seconds']:.1f} s CPU)"
    )
    return report


if __name__ == "__main__":
    run_cli(main, Args)
