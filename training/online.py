"""The iterated online loop of Bai et al. 2022 (section 4.5): rounds of sample -> compare ->
release the grown data as the next minor version -> retrain the reward model and the policy.

Each round, in order, each step recorded in ``<work dir>/steps.jsonl`` when it finishes:

1. ``sample``: N prompts from the release's training split (never a prompt of its test split,
   which the measurements use), two replies each from the current policy; the two replies
   share the prompt's forward pass (one key-value cache, duplicated), or, with ``--pairing
   previous``, the second comes from the previous round's policy;
2. ``label``: a labeller (training/labellers.py: ``gold:RUN_DIR``, ``file:PATH``,
   ``queue:URL``) says which reply is better; a failure or a malformed batch stops here;
3. ``write``: the comparisons as raw HH JSONL, byte-exact transcripts, appended to the
   ``helpful-online`` / ``harmless-online`` subsets under ``<work dir>/raw/``, with the
   provenance sidecar (round, policy, labeller, tau, seed, sampling settings);
4. ``release``: ``<work dir>/raw/`` built as the next minor version with the previous one as
   ``--previous`` (the build refuses anything but a minor change), diffed;
5. ``publish``: to ``--repo`` with its tag, when given (a published version is never sent
   twice: on a resume a tag that already holds this manifest counts as done);
6. ``reward_model``: a reward model trained on the new version (from scratch, or the last
   round's with ``--warm-start``);
7. ``ppo``: PPO from the SFT policy (or the last round's with ``--ppo-from last``);
8. ``measure``: into ``rounds.json``, ``rounds.png`` and the README table of the work dir.

``--resume`` restarts at the first unfinished step (a trainer killed inside its step resumes
from its own checkpoint). The starting release is rebuilt from ``<work dir>/raw/``: its rows
written back as raw HH JSONL (docs/online.md).

The trainers get the loop's ``--precision``, ``--gradient-checkpointing`` and ``--lora-*``
flags (training/scale.py), and the loop samples and measures under the same autocast. With
``--launch-config`` the reward-model and PPO steps run as ``accelerate launch`` subprocesses
of the trainers' own command lines (several GPUs, DDP or FSDP) while the loop stays one
process; without it they run in this process.

    python -m training.online --data releases/1.0.0 --policy runs/sft \\
        --labeller gold:runs/gold --rounds 3 --comparisons-per-round 256 --work-dir runs/online
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch

from hhdata.errors import HhDataError, ReleaseError
from hhdata.pairs.transcript import render_transcript
from hhdata.release.diff import diff_releases, next_version
from hhdata.release.manifest import MANIFEST_NAME, read_manifest
from hhdata.schema import SUBSET_FAMILIES
from training import models, run, scale, vllm_generation
from training import ppo as ppo_trainer
from training import reward_model as rm_trainer
from training.common import UsageError, load_pairs, prompt_key, refuse_changed_settings, run_cli
from training.fast import sample
from training.labellers import (
    GoldScorer,
    LabelError,
    LabellerSpec,
    agreement,
    label_file,
    label_gold,
    label_queue,
    parse_labeller,
)
from training.ppo_eval import held_out_kl, held_out_rollouts
from training.rollout import fit_query, left_pad, start_length, truncate_at_stop
from training.text import encode_prompt, end_of_turn_id

STEPS = ("sample", "label", "write", "release", "publish", "reward_model", "ppo", "measure")
SETTINGS, JOURNAL = "online.json", "steps.jsonl"
SPEAKER_TAGS = ("\n\nHuman:", "\n\nAssistant:")


@dataclass(frozen=True)
class Args(scale.ScaleArgs, vllm_generation.GeneratorArgs):
    """The iterated online RLHF loop: sample, label, release, retrain, measure; R rounds.

    The rm_* and ppo_* fields are the reward-model and PPO trainers' flags of the same name
    without the prefix (trainer_args); the scale flags (--precision...) go to both.
    """

    data: str | None = None
    """the starting release: a release directory or a Hub repo id (required)"""
    version: str | None = None
    """the starting release's version when --data is a Hub repo (default: its latest)"""
    policy: str = "runs/sft"
    """the SFT run directory: the first round's policy and the reference of every round"""
    labeller: str = "gold:runs/gold"
    """gold:RUN_DIR (a reward model as simulated annotator), file:PATH (labelled JSONL,
    queue-results format) or queue:URL (the feedback app's queue)"""
    gold: str | None = None
    """a reward-model run that scores the measurements (gold score, win rate, label
    agreement); default: the gold labeller's run, else no gold measurements"""
    reward_model: str | None = None
    """the proxy reward model before round 1 (its accuracy on round 1's pairs); optional"""
    work_dir: str = "runs/online"
    """where the raw data, releases, round runs, steps.jsonl, rounds.json and README go"""
    repo: str | None = None
    """publish each version to this Hub dataset repo (org/name) and tag it"""
    hub_token_env: str = "HF_TOKEN"
    """environment variable holding the Hub write token"""
    rounds: int = 2
    """rounds of the loop"""
    comparisons_per_round: int = 64
    """prompts sampled (and pairs labelled) per round"""
    seed: int = 1
    """seed of the prompt choice, sampling, gold labels and every trainer"""
    tau: float = 1.0
    """temperature of the gold annotator: P(A) = sigmoid((r_A - r_B) / tau); 0: noiseless"""
    pairing: Literal["same", "previous"] = "same"
    """both replies from the current policy, or the second from the previous round's policy"""
    response_length: int = 32
    """most tokens per sampled reply"""
    temperature: float = 0.7
    """sampling temperature"""
    query_length: int = 128
    """longest prompt in tokens when sampling (the latest turns are kept)"""
    sample_batch_size: int = 16
    """prompts per sampling batch"""
    eval_prompts: int = 32
    """held-out (test split) prompts on which each round's policy is measured"""
    warm_start: bool = False
    """start each round's reward model from the last one's weights instead of from scratch"""
    reward_model_base: str = "auto"
    """the reward model's starting weights: auto = the SFT run's model (tiny: a seeded random
    tiny decoder with the policy's tokenizer), or a model name/directory"""
    ppo_from: Literal["sft", "last"] = "sft"
    """start each round's PPO from the SFT policy (the paper's choice) or the last round's"""
    queue_timeout: float = 86400.0
    """seconds the queue labeller waits for every pair of a round to be labelled"""
    queue_token_env: str = "HHDATA_ADMIN_TOKEN"
    """environment variable holding the feedback app's admin token (queue labeller)"""
    rm_learning_rate: float = 5e-4
    """reward model: learning rate"""
    rm_batch_size: int = 16
    """reward model: pairs per step"""
    rm_epochs: int = 1
    """reward model: passes over the release's training pairs"""
    rm_max_steps: int | None = None
    """reward model: stop after this many steps"""
    rm_max_length: int = 256
    """reward model: most tokens of prompt + reply"""
    rm_max_eval_pairs: int | None = None
    """reward model: evaluate on only the first N held-out pairs"""
    rm_micro_batch_cost: int = 64
    """reward model: padded-token cost allowed per extra micro-batch (-1: one padded batch per
    process per step, which --launch-config with an FSDP or DeepSpeed config needs)"""
    ppo_total_episodes: int = 256
    """PPO: prompts answered over the run"""
    ppo_batch_size: int = 16
    """PPO: replies per update"""
    ppo_num_mini_batches: int = 2
    """PPO: minibatches per batch"""
    ppo_num_ppo_epochs: int = 4
    """PPO: passes over each batch"""
    ppo_learning_rate: float = 1e-5
    """PPO: learning rate (use ~1e-3 for the tiny model)"""
    ppo_kl_coef: float = 0.05
    """PPO: initial KL coefficient"""
    ppo_reward_norm_samples: int = 64
    """PPO: reference replies that estimate the reward normalisation"""
    ppo_eval_prompts: int = 16
    """PPO: its own held-out prompts"""
    launch_config: str | None = None
    """an accelerate config (training/configs/ddp.yaml, fsdp.yaml for the reward model only):
    the reward-model and PPO steps run as `accelerate launch --config_file CONFIG -m
    training.reward_model|ppo ...` subprocesses, logged to <round>/<step>.log; default: in this
    process"""
    num_processes: int | None = None
    """processes of each launch (with --launch-config; default: the config's num_processes)"""
    resume: bool = False
    """continue the loop in work_dir at its first unfinished step (same settings required)"""
    stop_after: str | None = None
    """ROUND:STEP, e.g. 1:release: return right after that step is recorded, as if killed
    (for testing resume)"""


# ---- the journal: what finished, so a resume starts at the first step that did not ---------


def read_journal(work_dir: Path) -> dict[tuple[int, str], dict]:
    """(round, step) -> the recorded result of every finished step (round 0: the setup)."""
    path = work_dir / JOURNAL
    if not path.is_file():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            done[(entry["round"], entry["step"])] = entry
    return done


def record_step(work_dir: Path, round_number: int, step: str, result: dict, seconds: float):
    """Append a finished step to the journal (one line, flushed and synced before returning)."""
    entry = {"round": round_number, "step": step, "seconds": seconds, "result": result}
    with open(work_dir / JOURNAL, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return entry


def write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path`, written to a temporary name and renamed (a kill leaves old or new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.rename(path)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Records as JSON Lines, atomically."""
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON Lines file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# ---- the starting release, rebuildable: its rows as raw HH JSONL --------------------------


def release_path(data: str, version: str | None) -> Path:
    """The local directory of the starting release (a Hub repo is downloaded)."""
    path = Path(data)
    if version is not None and (path / version / MANIFEST_NAME).is_file():
        path = path / version
    if (path / MANIFEST_NAME).is_file():
        return path
    if path.exists():
        raise UsageError(f"--data {data}: not a release directory (no {MANIFEST_NAME})")
    from hhdata.hub import download_release

    return Path(download_release(data, version))


def gzip_bytes(text: str) -> bytes:
    """gzip without a timestamp, so the same lines give the same bytes."""
    return gzip.compress(text.encode("utf-8"), mtime=0)


def raw_line(chosen_text: str, rejected_text: str) -> str:
    """One raw HH-RLHF record: the two whole transcripts, byte for byte."""
    return json.dumps({"chosen": chosen_text, "rejected": rejected_text}, ensure_ascii=False)


def write_start_raw(start: Path, raw: Path) -> dict:
    """The starting release's rows written back as raw HH JSONL, ``raw/<subset>/<split>.jsonl.gz``
    in release order: rebuilding them gives the same rows (the build is deterministic and
    deduplication is idempotent), so each round's release is the old rows plus the new."""
    splits, _ = load_pairs(str(start))
    files: dict[tuple[str, str], list[str]] = {}
    for split_rows in splits.values():
        for row in split_rows:
            key = (row["subset"], row["split"])
            files.setdefault(key, []).append(raw_line(row["chosen_text"], row["rejected_text"]))
    for (subset, split), lines in sorted(files.items()):
        write_atomic(raw / subset / f"{split}.jsonl.gz", gzip_bytes("\n".join(lines) + "\n"))
    return {f"{subset}/{split}": len(lines) for (subset, split), lines in sorted(files.items())}


# ---- 1. sample ------------------------------------------------------------------------------


def reply_text(tokenizer, tokens: torch.Tensor, keep: torch.Tensor) -> str:
    """A sampled reply's words, cut where the model starts a new turn (a speaker tag would
    make the transcript parse into more turns than were sampled)."""
    text = tokenizer.decode(tokens[keep], skip_special_tokens=True)
    cuts = [text.find(tag) for tag in SPEAKER_TAGS if tag in text]
    return text[: min(cuts)] if cuts else text


def same_reply(a: str, b: str) -> bool:
    """Replies the release's dedup would call identical (NFC, lower case, whitespace collapsed):
    no comparison, so they are not labelled."""

    def norm(text: str) -> str:
        return " ".join(unicodedata.normalize("NFC", text).lower().split())

    return norm(a) == norm(b)


def training_prompts(splits: dict, used: set, count: int, seed: int) -> list[dict]:
    """`count` rows with distinct prompts of the train split, none in another split (those are
    the measurements' held-out prompts) and, while enough remain, none used by earlier rounds."""
    if "train" not in splits:
        raise UsageError(f"the starting release has no train split (it has {sorted(splits)})")
    held_out = {prompt_key(row) for name, rows in splits.items() if name != "train" for row in rows}
    candidates, seen = [], set()
    for row in splits["train"]:
        key = prompt_key(row)
        if key not in held_out and key not in seen:
            candidates.append(row)
            seen.add(key)
    fresh = [row for row in candidates if prompt_key(row) not in used]
    pool = fresh if len(fresh) >= count else candidates
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    return [pool[i] for i in order[:count]]


def held_out_rows(splits: dict, count: int, seed: int) -> list[dict]:
    """`count` rows of distinct prompts from the splits other than train (the measurements')."""
    rows, seen = [], set()
    for name in sorted(splits):
        if name != "train":
            for row in splits[name]:
                if prompt_key(row) not in seen:
                    rows.append(row)
                    seen.add(prompt_key(row))
    if not rows:
        raise UsageError("the starting release has no test split to measure the policies on")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in order[:count]]


class Policy:
    """A policy directory loaded for sampling, with the SFT run's text format."""

    def __init__(self, folder: str, chat: bool):
        self.folder = folder
        self.tokenizer = models.load_tokenizer(folder)
        self.model = models.load_causal_lm(folder, self.tokenizer).eval()
        run.disable_dropout(self.model)
        self.chat = chat
        self.stop_id = end_of_turn_id(self.tokenizer, chat)

    def queries(self, rows: list[dict], limit: int) -> list[list[int]]:
        """Each row's prompt as the policy reads it, cut to `limit` tokens (latest turns kept)."""
        start = start_length(self.tokenizer, self.chat)
        return [
            fit_query(encode_prompt(self.tokenizer, row["prompt"], self.chat)[0], limit, start)
            for row in rows
        ]

    def texts(self, tokens: torch.Tensor) -> list[str]:
        """Reply texts of sampled tokens, shape [n, length]."""
        keep, _ = truncate_at_stop(tokens, self.stop_id)
        return [reply_text(self.tokenizer, t, k) for t, k in zip(tokens, keep)]


def sample_round(
    args: Args, rows: list[dict], current: Policy, previous: Policy, seed: int, engine=None
):
    """Two replies per row: both from `current` (shared prompt pass), or A from `current` and
    B from `previous` (--pairing previous). With a vLLM `engine` (--generator vllm), each
    policy's weights are pushed into it before it samples."""
    generator = torch.Generator().manual_seed(seed)
    replies = []
    pushed = []  # the policy whose weights the engine holds

    def sampler(policy: Policy):
        if engine is None:
            return sample
        if not pushed or pushed[0] is not policy:
            engine.sync_weights(policy.model)
            pushed[:] = [policy]
        return engine.sample

    # vLLM batches requests itself: every row in one call, so each policy is pushed once
    batch_size = args.sample_batch_size if engine is None else len(rows)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids, mask = left_pad(
            current.queries(batch, args.query_length), current.tokenizer.pad_token_id
        )
        if args.pairing == "same":
            # the prompt's pass shared: rows 2i and 2i+1 answer query i
            tokens, _ = sampler(current)(
                current.model,
                ids,
                mask,
                args.response_length,
                args.temperature,
                current.stop_id,
                generator,
                copies=2,
            )
            texts = current.texts(tokens)
            replies += [(texts[2 * i], texts[2 * i + 1]) for i in range(len(batch))]
        else:
            pairs = []
            for policy in (current, previous):
                ids, mask = left_pad(
                    policy.queries(batch, args.query_length), policy.tokenizer.pad_token_id
                )
                tokens, _ = sampler(policy)(
                    policy.model,
                    ids,
                    mask,
                    args.response_length,
                    args.temperature,
                    policy.stop_id,
                    generator,
                )
                pairs.append(policy.texts(tokens))
            replies += list(zip(*pairs))
    return replies


# ---- 3. write: raw HH JSONL + provenance sidecar --------------------------------------------


def online_subset(family: str) -> str:
    """The subset a family's new comparisons go to, named like upstream's."""
    subset = f"{family}-online"
    if SUBSET_FAMILIES.get(subset) != family:
        raise UsageError(
            f"{subset} is not a subset this hhdata knows, so a build cannot place {family} "
            "comparisons yet; sample only prompts of the other family (a release without "
            f"{family} training prompts), or update hhdata"
        )
    return subset


def write_online_subsets(
    work_dir: Path, start_splits: dict, round_number: int, provenance_of
) -> dict:
    """Rewrite ``raw/<family>-online/train.jsonl.gz`` and its provenance sidecar from the
    starting release's own rows of that subset (if any) and rounds 1..`round_number`'s labels.

    Rewritten whole each time, deterministically, so a step killed halfway is simply redone.
    """
    subsets: dict[str, tuple[list[str], list[dict]]] = {}
    for row in start_splits.get("train", []):
        if row["subset"].endswith("-online"):
            lines, provenance = subsets.setdefault(row["subset"], ([], []))
            lines.append(raw_line(row["chosen_text"], row["rejected_text"]))
            provenance.append({"round": 0, "source": "starting release"})
    for number in range(1, round_number + 1):
        folder = round_dir(work_dir, number)
        samples = {s["key"]: s for s in read_jsonl(folder / "samples.jsonl")}
        for label in read_jsonl(folder / "labels.jsonl"):
            if label.get("skipped"):
                continue
            sample = samples[label["key"]]
            prompt = sample["prompt"]
            chosen = render_transcript(prompt + [{"role": "assistant", "content": label["chosen"]}])
            rejected = render_transcript(
                prompt + [{"role": "assistant", "content": label["rejected"]}]
            )
            lines, provenance = subsets.setdefault(online_subset(sample["family"]), ([], []))
            lines.append(raw_line(chosen, rejected))
            provenance.append(provenance_of(number, sample))
    counts = {}
    for subset, (lines, provenance) in sorted(subsets.items()):
        folder = work_dir / "raw" / subset
        write_atomic(folder / "train.jsonl.gz", gzip_bytes("\n".join(lines) + "\n"))
        write_atomic(folder / "train.provenance.json", json.dumps(provenance, indent=1).encode())
        counts[f"{subset}/train"] = len(lines)
    return counts


# ---- 4-5. release and publish ----------------------------------------------------------------


def build_round_release(work_dir: Path, previous: Path, version: str, name: str | None) -> dict:
    """``raw/`` built as `version` with `previous` as --previous (the build itself refuses any
    change but a minor one for a minor version), then diffed; returns what the journal keeps."""
    from hhdata.dedup.run import DedupSettings
    from hhdata.pipeline import build_release
    from hhdata.release.write import DEFAULT_NAME

    out = work_dir / "releases"
    target = out / version
    if not (target / MANIFEST_NAME).is_file():  # built before a kill: the same inputs, reused
        settings = read_manifest(previous).get("settings", {}).get("dedup", {})
        dedup = DedupSettings(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
        )
        build_release(
            [work_dir / "raw"],
            version=version,
            out=out,
            previous=previous,
            dedup_settings=dedup,
            name=name or DEFAULT_NAME,
        )
    change = diff_releases(previous, target)
    if change.change != "minor":
        raise ReleaseError(
            f"{target}: the change from {change.old_version} is {change.change}, not minor; the "
            "new comparisons must only add rows (hhdata diff shows which ids changed)"
        )
    manifest = read_manifest(target)
    return {
        "version": version,
        "path": str(target),
        "change": change.change,
        "added": len(change.configs["all"].added),
        "rows": manifest["accounting"]["kept"],
        # the starting release's rows are all kept again (they were deduplicated once
        # already), so whatever this build dropped is new comparisons: usually a near
        # duplicate of a row with the same prompt when replies are short next to the prompt
        "dropped": {
            reason: count
            for fate in ("quarantined", "removed", "filtered")
            for reason, count in manifest["accounting"][fate].items()
        },
    }


def publish_once(path: Path, repo: str, token: str | None) -> dict:
    """Publish a release and tag it, unless the tag already holds exactly this manifest (a run
    killed after publishing): a version is never published twice."""
    from huggingface_hub import hf_hub_download

    from hhdata.hub import publish
    from hhdata.hub.client import hub_api

    version = read_manifest(path)["version"]
    tag = f"v{version}"
    api = hub_api(token, None)
    tags = set()
    if api.repo_exists(repo, repo_type="dataset"):  # else the first version creates it
        tags = {ref.name for ref in api.list_repo_refs(repo, repo_type="dataset").tags}
    if tag in tags:
        with tempfile.TemporaryDirectory() as cache:
            remote = hf_hub_download(
                repo,
                MANIFEST_NAME,
                repo_type="dataset",
                revision=tag,
                token=api.token,
                endpoint=api.endpoint,
                cache_dir=cache,
            )
            same = Path(remote).read_bytes() == (path / MANIFEST_NAME).read_bytes()
        if not same:
            raise ReleaseError(
                f"{repo} already has {tag} with another manifest; a published version is never "
                "published again: use a new --repo or remove the work dir's rounds"
            )
        return {"repo": repo, "tag": tag, "already_published": True}
    result = publish(path, repo, token=api.token, endpoint=api.endpoint)
    return {"repo": repo, "tag": tag, "commit": result.commit}


# ---- 8. measure -------------------------------------------------------------------------------


def proxy_accuracy(rm_dir: str | None, samples: list[dict], labels: list[dict]) -> float | None:
    """Share of the round's labelled pairs a reward model ranks as the labeller did."""
    if rm_dir is None:
        return None
    scorer = GoldScorer(rm_dir)
    prompts = {s["key"]: s["prompt"] for s in samples}
    kept = [label for label in labels if not label.get("skipped")]
    keys = [prompts[label["key"]] for label in kept]
    chosen = scorer(keys, [label["chosen"] for label in kept])
    rejected = scorer(keys, [label["rejected"] for label in kept])
    return float(((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean())


def mean_ci(values: torch.Tensor) -> dict:
    """Mean and a 95% normal confidence interval."""
    mean = float(values.mean())
    half = 1.96 * float(values.std()) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(values)}


def measure_policies(args: Args, rows, policy: Policy, previous: Policy, reference: Policy, gold):
    """Gold score (with CI), KL to the reference and win rate against the previous policy, on
    the held-out rows, every policy meeting the same random numbers."""
    settings = SimpleNamespace(
        seed=args.seed,
        batch_size=args.sample_batch_size,
        response_length=args.response_length,
        temperature=args.temperature,
    )
    device = torch.device("cpu")

    def replies(p: Policy):
        queries = p.queries(rows, args.query_length)
        batches = held_out_rollouts(
            p.model, queries, settings, p.tokenizer.pad_token_id, p.stop_id, device
        )
        return batches, [
            reply_text(p.tokenizer, t, k)
            for b in batches
            for t, k in zip(b.responses, b.response_mask)
        ]

    batches, texts = replies(policy)
    result = {
        "kl_to_reference": float(
            held_out_kl(policy.model, reference.model, batches, args.temperature).mean()
        ),
        "reply_length_tokens": float(
            torch.cat([b.response_mask.sum(1) for b in batches]).float().mean()
        ),
    }
    if gold is not None:
        prompts = [row["prompt"] for row in rows]
        mine = gold(prompts, texts)
        _, before = replies(previous)
        theirs = gold(prompts, before)
        result["gold_score"] = mean_ci(mine)
        result["previous_gold_score"] = mean_ci(theirs)
        wins = (mine > theirs).float() + 0.5 * (mine == theirs).float()
        result["win_rate_vs_previous"] = mean_ci(wins)
    return result


# ---- 6-7. the trainers: in this process, or launched -----------------------------------------


class LaunchError(HhDataError):
    """A trainer launched by the loop (--launch-config) failed; its log says why."""


def trainer_args(cls, args: Args, prefix: str, **given):
    """The trainer Args `cls` from the loop's: each `prefix`ed field under its own name
    (rm_batch_size -> batch_size) where `cls` has that name, every field `cls` shares with the
    loop's bases (ScaleArgs: --precision, --lora-rank...; GeneratorArgs for PPO), then `given`.

    >>> trainer_args(rm_trainer.Args, Args(rm_batch_size=4, lora_rank=8), "rm_").batch_size
    4
    """
    own = {field.name for field in fields(cls)}
    shared = {
        field.name
        for base in (scale.ScaleArgs, vllm_generation.GeneratorArgs)
        for field in fields(base)
    }
    values = {name: getattr(args, name) for name in shared & own}
    for field in fields(args):
        name = field.name.removeprefix(prefix)
        if field.name.startswith(prefix) and name in own:  # ppo_from is the loop's own
            values[name] = getattr(args, field.name)
    return cls(**(values | given))


def command_line(args) -> list[str]:
    """The flags that parse back to the dataclass `args` (training.common.parse_args): each
    field that differs from its default.

    >>> command_line(rm_trainer.Args(run_dir="runs/rm", resume=True, max_steps=4))
    ['--run-dir', 'runs/rm', '--max-steps', '4', '--resume']
    """
    words = []
    for field in fields(args):
        value = getattr(args, field.name)
        if value == field.default:
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            for item in value:
                words += [flag, str(item)]
        elif value is None:
            raise ValueError(f"{flag}: None (the default is {field.default!r}) has no flag")
        else:
            words += [flag, str(value)]
    return words


def check_launch(args: Args) -> None:
    """Refuse --launch-config / --num-processes that no launch could use, before round 1."""
    if args.launch_config is None:
        if args.num_processes is not None:
            raise UsageError("--num-processes needs --launch-config (an accelerate config)")
        return
    if args.num_processes is not None and args.num_processes < 1:
        raise UsageError(f"--num-processes {args.num_processes}: pass 1 or more")
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    try:  # accelerate's own reading of it, as its launcher reads it
        config = load_config_from_file(args.launch_config)
    except FileNotFoundError:
        raise UsageError(
            f"--launch-config {args.launch_config}: no such file; pass an accelerate config such "
            "as training/configs/ddp.yaml"
        ) from None
    except (TypeError, ValueError, AttributeError, KeyError, yaml.YAMLError) as error:
        raise UsageError(
            f"--launch-config {args.launch_config}: accelerate cannot read it as a config "
            f"({' '.join(str(error).split())})"
        ) from None
    engine = getattr(config.distributed_type, "value", config.distributed_type)  # a str enum
    if engine in ("FSDP", "DEEPSPEED") and args.rm_micro_batch_cost >= 0:
        raise UsageError(  # the reward model would refuse it mid-round, after the release
            f"--launch-config {args.launch_config} shards the models ({engine}): "
            "every process must run as many passes per step; add --rm-micro-batch-cost -1"
        )


def free_port() -> int:
    """A TCP port free on this machine now, for the launch's rendezvous (accelerate's default,
    29500, is taken by any other launch running here)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(args: Args, module: str, trainer: object) -> list[str]:
    """`accelerate launch` of the trainer `module`'s command line with `trainer`'s Args."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    command += ["--config_file", args.launch_config]
    if args.num_processes is not None:
        command += ["--num_processes", str(args.num_processes)]
    if "main_process_port" not in Path(args.launch_config).read_text():
        command += ["--main_process_port", str(free_port())]
    return command + ["-m", module] + command_line(trainer)


def train(args: Args, module, trainer, run_dir: Path, log: Path, step: str) -> dict:
    """Run the trainer `module` (training.reward_model, training.ppo) with its Args `trainer`;
    returns its metrics: main's result in this process, or under --launch-config the
    metrics.json the launched run wrote in `run_dir`, its output in `log`."""
    if args.launch_config is None:
        return module.main(trainer)
    command = launch_command(args, module.__name__, trainer)
    env = dict(os.environ)  # the launched processes import this copy of the trainers
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    print(f"online: {step}: {' '.join(command)} > {log}")
    with open(log, "w", encoding="utf-8") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0 or not (run_dir / "metrics.json").is_file():
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        last = f" (last line: {lines[-1].strip()[:200]})" if lines else ""
        raise LaunchError(
            f"{step}: the launched trainer exited with code {done.returncode}; its output is in "
            f"{log}{last}"
        )
    return json.loads((run_dir / "metrics.json").read_text())


# ---- the loop ----------------------------------------------------------------------------------


def round_dir(work_dir: Path, number: int) -> Path:
    """Where round `number`'s samples, labels and runs go."""
    return work_dir / f"round-{number:03d}"


def sft_chat(policy_dir: str) -> bool:
    """Whether the SFT run rendered with its chat template (its args.json), as sampling must."""
    settings = Path(policy_dir) / "args.json"
    if not settings.is_file():
        raise UsageError(f"--policy {policy_dir}: no args.json; pass an SFT run directory")
    return json.loads(settings.read_text()).get("chat_template", True)


def reward_model_base(args: Args, work_dir: Path) -> str:
    """The reward model's starting weights for --reward-model-base auto: the SFT run's model,
    or for tiny a seeded random tiny decoder saved with the policy's tokenizer (a fresh tiny
    run would train another tokenizer, which PPO would refuse)."""
    if args.reward_model_base != "auto":
        return args.reward_model_base
    sft_model = json.loads((Path(args.policy) / "args.json").read_text())["args"]["model"]
    if sft_model != models.TINY:
        return sft_model
    base = work_dir / "base-model"
    if not (base / "config.json").is_file():
        tokenizer = models.load_tokenizer(args.policy)
        backbone = models.load_backbone(models.TINY, tokenizer, seed=args.seed)
        partial = base.with_name("base-model.partial")
        shutil.rmtree(partial, ignore_errors=True)
        backbone.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        partial.rename(base)
    return str(base)


def check_settings(args: Args, work_dir: Path) -> None:
    """A fresh loop needs an empty work dir; a resumed one the same settings."""
    settings = work_dir / SETTINGS
    if args.resume:
        if not settings.is_file():
            raise UsageError(f"{work_dir}: no loop to resume ({SETTINGS} missing); drop --resume")
        refuse_changed_settings(work_dir, SETTINGS, run.comparable_args(args))
        return
    if (work_dir / JOURNAL).exists() or settings.exists():
        raise UsageError(
            f"{work_dir} already holds a loop; pass --resume to continue it or pick another "
            "--work-dir"
        )
    run.write_json(
        settings, run.settings_record(args, command=run.command("training.online", __name__))
    )


def parse_stop(stop_after: str | None) -> tuple[int, str] | None:
    """--stop-after ROUND:STEP -> (round, step)."""
    if stop_after is None:
        return None
    number, _, step = stop_after.partition(":")
    if not number.isdigit() or step not in ("setup",) + STEPS:
        raise UsageError(
            f"--stop-after {stop_after!r}: expected ROUND:STEP with STEP one of {list(STEPS)} "
            "(0:setup for the setup)"
        )
    return int(number), step


@dataclass
class Loop:
    """What every round reads: the settings, the journal, the data and the fixed models."""

    args: Args
    work_dir: Path
    done: dict
    start: Path
    splits: dict
    eval_rows: list[dict]
    chat: bool
    base: str
    labeller: LabellerSpec
    gold: GoldScorer | None
    reference: Policy

    def policy_dir(self, number: int) -> str:
        """The policy that samples round `number`: the SFT policy, then the last round's PPO."""
        if number <= 1:
            return self.args.policy
        return str(round_dir(self.work_dir, number - 1) / "ppo" / "policy")

    def shown(self, folder: str) -> str:
        """A policy as the provenance names it: inside the work dir relative to it (so two
        copies of a loop record the same), else as given."""
        path = Path(folder)
        return (
            str(path.relative_to(self.work_dir)) if path.is_relative_to(self.work_dir) else folder
        )

    def result(self, number: int, step: str) -> dict:
        """A finished step's recorded result."""
        return self.done[(number, step)]["result"]


class Round:
    """The steps of one round, each a method returning what the journal records."""

    def __init__(self, loop: Loop, number: int):
        self.loop, self.args, self.number = loop, loop.args, number
        self.folder = round_dir(loop.work_dir, number)
        self.seed = loop.args.seed * 1000 + number
        self.current_dir = loop.policy_dir(number)
        self.previous_dir = loop.policy_dir(number - 1)
        self.previous_release = (
            loop.start if number == 1 else Path(loop.result(number - 1, "release")["path"])
        )
        self.version = next_version(read_manifest(self.previous_release)["version"], "minor")

    def release_dir(self) -> str:
        return self.loop.result(self.number, "release")["path"]

    def train(self, module, trainer, run_dir: Path, step: str) -> dict:
        """A trainer's metrics, run here or launched (logged to <round>/<step>.log)."""
        log = self.folder / f"{step}.log"
        return train(self.args, module, trainer, run_dir, log, f"round {self.number} {step}")

    def sample(self) -> dict:
        """1. Prompts of the train split, two replies each; identical pairs are left out."""
        used = set()
        for earlier in range(1, self.number):
            for s in read_jsonl(round_dir(self.loop.work_dir, earlier) / "samples.jsonl"):
                used.add(tuple((t["role"], t["content"]) for t in s["prompt"]))
        rows = training_prompts(self.loop.splits, used, self.args.comparisons_per_round, self.seed)
        current = Policy(self.current_dir, self.loop.chat)
        same = self.args.pairing == "same"
        previous = current if same else Policy(self.previous_dir, self.loop.chat)
        engine = None
        if self.args.generator == "vllm":  # one engine for the loop, the SFT policy's shape
            engine = vllm_generation.engine(
                self.args.policy,
                self.args,
                self.args.query_length + self.args.response_length,
                self.args.seed,
            )
        with models.cpu_autocast(self.args.precision):
            pairs = sample_round(self.args, rows, current, previous, self.seed, engine)
        samples, identical = [], 0
        for index, (row, (a, b)) in enumerate(zip(rows, pairs)):
            if same_reply(a, b):
                identical += 1
                continue
            online_subset(row["family"])  # refuse a family no subset can take, now
            samples.append(
                {
                    "key": f"{self.loop.work_dir.name}/round-{self.number:03d}/{index:05d}",
                    "family": row["family"],
                    "prompt": row["prompt"],
                    "replies": [a, b],
                    "models": [self.loop.shown(current.folder), self.loop.shown(previous.folder)],
                }
            )
        if not samples:
            raise LabelError(
                f"round {self.number}: every sampled pair had identical replies; raise "
                "--temperature or --response-length"
            )
        write_jsonl(self.folder / "samples.jsonl", samples)
        return {"prompts": len(rows), "pairs": len(samples), "identical_replies": identical}

    def label(self) -> dict:
        """2. The labeller's verdicts, checked; the gold model's agreement with them."""
        samples = read_jsonl(self.folder / "samples.jsonl")
        kind, arg = self.loop.labeller.kind, self.loop.labeller.arg
        if kind == "gold":
            gold = self.loop.gold if self.loop.gold.run_dir == arg else GoldScorer(arg)
            labels = label_gold(samples, gold, self.args.tau, self.seed)
        elif kind == "file":
            labels = label_file(samples, arg, self.number)
        else:
            labels = label_queue(
                samples, arg, self.number, self.args.queue_token_env, self.args.queue_timeout
            )
        write_jsonl(self.folder / "labels.jsonl", labels)
        result = {
            "labelled": sum(not label.get("skipped") for label in labels),
            "skipped": sum(bool(label.get("skipped")) for label in labels),
        }
        if self.loop.gold is not None:
            result["gold_agreement"] = agreement(labels, self.loop.gold, samples)["agreement"]
        return result

    def provenance(self, number: int, sample: dict) -> dict:
        """The sidecar object of one written comparison."""
        return {
            "round": number,
            "policy": sample["models"][0],
            "policy_b": sample["models"][1],
            "labeller": str(self.loop.labeller),
            "tau": self.args.tau if self.loop.labeller.kind == "gold" else None,
            "seed": self.args.seed,
            "pairing": self.args.pairing,
            "temperature": self.args.temperature,
            "response_length": self.args.response_length,
            "key": sample["key"],
        }

    def write(self) -> dict:
        """3. The online subsets rewritten with this round's comparisons added."""
        return write_online_subsets(
            self.loop.work_dir, self.loop.splits, self.number, self.provenance
        )

    def release(self) -> dict:
        """4. The next minor version, diffed against the last."""
        return build_round_release(
            self.loop.work_dir, self.previous_release, self.version, self.args.repo
        )

    def publish(self) -> dict:
        """5. Published and tagged once, when --repo is given."""
        if not self.args.repo:
            return {"skipped": "no --repo"}
        token = os.environ.get(self.args.hub_token_env)
        return publish_once(Path(self.release_dir()), self.args.repo, token)

    def reward_model(self) -> dict:
        """6. The proxy reward model on the new version (scratch, or warm from the last)."""
        run_dir = self.folder / "reward-model"
        warm = self.args.warm_start and self.number > 1
        last = round_dir(self.loop.work_dir, self.number - 1) / "reward-model" / "model"
        trainer = trainer_args(
            rm_trainer.Args,
            self.args,
            "rm_",
            data=self.release_dir(),
            model=str(last) if warm else self.loop.base,
            run_dir=str(run_dir),
            seed=self.args.seed,
            resume=run.latest_checkpoint(run_dir) is not None,
        )
        metrics = self.train(rm_trainer, trainer, run_dir, "reward_model")
        return {"run": str(run_dir), "held_out_accuracy": metrics["overall"]["accuracy"]}

    def ppo(self) -> dict:
        """7. PPO against the new reward model, from the SFT policy or the last round's."""
        output_dir = self.folder / "ppo"
        a = self.args
        trainer = trainer_args(
            ppo_trainer.Args,
            a,
            "ppo_",
            policy=a.policy if a.ppo_from == "sft" else self.current_dir,
            reward_model=str(self.folder / "reward-model"),
            data=self.release_dir(),
            output_dir=str(output_dir),
            seed=a.seed,
            query_length=a.query_length,
            response_length=a.response_length,
            temperature=a.temperature,
            num_samples_shown=0,
            resume=run.latest_checkpoint(output_dir) is not None,
        )  # generator too: the loop's vLLM engine, when it has one, serves PPO too
        metrics = self.train(ppo_trainer, trainer, output_dir, "ppo")
        return {"run": str(output_dir), "proxy_win_rate": metrics["evaluation"]["win_rate"]}

    def measure(self) -> dict:
        """8. Proxy accuracy on the round's pairs before and after, the new policy's gold score,
        KL to the reference and win rate against the policy that sampled the round."""
        samples = read_jsonl(self.folder / "samples.jsonl")
        labels = read_jsonl(self.folder / "labels.jsonl")
        last_rm = round_dir(self.loop.work_dir, self.number - 1) / "reward-model"
        before = self.args.reward_model if self.number == 1 else str(last_rm)
        labelled = self.loop.result(self.number, "label")
        with models.cpu_autocast(self.args.precision):  # the precision the models trained at
            result = {
                "round": self.number,
                "version": self.version,
                "pairs": labelled["labelled"],
                "proxy_accuracy_before": proxy_accuracy(before, samples, labels),
                "proxy_accuracy_after": proxy_accuracy(
                    str(self.folder / "reward-model"), samples, labels
                ),
                "gold_agreement": labelled.get("gold_agreement"),
            }
            result |= measure_policies(
                self.args,
                self.loop.eval_rows,
                Policy(str(self.folder / "ppo" / "policy"), self.loop.chat),
                Policy(self.current_dir, self.loop.chat),
                self.loop.reference,
                self.loop.gold,
            )
        return result


def main(args: Args) -> dict:
    """Run (or resume) the loop; returns rounds.json's content."""
    vllm_generation.require(args.generator)
    if args.data is None:
        raise UsageError("--data is required: the starting release (a directory or Hub repo id)")
    if args.rounds < 1 or args.comparisons_per_round < 1:
        raise UsageError("--rounds and --comparisons-per-round must be at least 1")
    check_launch(args)
    if args.precision == "fp16" and not torch.cuda.is_available():
        raise UsageError(
            "--precision fp16 needs a GPU (the trainers' fp16 loss scaling does not run on the "
            "CPU); use --precision bf16 or fp32 here"
        )
    labeller = parse_labeller(args.labeller)
    gold_dir = args.gold or (labeller.arg if labeller.kind == "gold" else None)
    stop = parse_stop(args.stop_after)
    work_dir = Path(args.work_dir)
    chat = sft_chat(args.policy)
    work_dir.mkdir(parents=True, exist_ok=True)
    check_settings(args, work_dir)
    done = read_journal(work_dir)

    def step(number: int, name: str, body) -> bool:
        """Run a step unless the journal has it; True when --stop-after says stop here."""
        if (number, name) in done:
            return False
        started = time.perf_counter()
        result = body()
        seconds = time.perf_counter() - started
        done[(number, name)] = record_step(work_dir, number, name, result, seconds)
        print(f"online: round {number} {name} done in {seconds:.1f} s")
        return stop == (number, name)

    if step(0, "setup", lambda: setup(args, work_dir)):
        return {"stopped_after": args.stop_after}
    start = Path(done[(0, "setup")]["result"]["release"])
    splits, _ = load_pairs(str(start))
    loop = Loop(
        args,
        work_dir,
        done,
        start,
        splits,
        held_out_rows(splits, args.eval_prompts, args.seed),
        chat,
        reward_model_base(args, work_dir),
        labeller,
        GoldScorer(gold_dir) if gold_dir else None,
        Policy(args.policy, chat),
    )
    for number in range(1, args.rounds + 1):
        this_round = Round(loop, number)
        for name in STEPS:
            if step(number, name, getattr(this_round, name)):
                return {"stopped_after": args.stop_after}
        write_report(work_dir, done, args)
    return write_report(work_dir, done, args)


def setup(args: Args, work_dir: Path) -> dict:
    """Round 0: the starting release's rows as raw files in the work dir."""
    start = release_path(args.data, args.version)
    counts = write_start_raw(start, work_dir / "raw")
    return {"release": str(start), "version": read_manifest(start)["version"], "raw": counts}


# ---- the report: rounds.json, rounds.png, README.md ----------------------------------------------


def write_report(work_dir: Path, done: dict, args: Args) -> dict:
    """rounds.json (every round's measurements and step times), a plot and the README table."""
    rounds = []
    for number in range(1, args.rounds + 1):
        if (number, "measure") not in done:
            break
        entry = dict(done[(number, "measure")]["result"])
        entry["seconds"] = {name: done[(number, name)]["seconds"] for name in STEPS}
        rounds.append(entry)
    report = {"setup": done[(0, "setup")]["result"], "rounds": rounds}
    run.write_json(work_dir / "rounds.json", report)
    with run.plot(work_dir / "rounds.png", 1, 2, size=(10, 3.5)) as (left, right):
        numbers = [r["round"] for r in rounds]
        if rounds and "gold_score" in rounds[0]:
            means = [r["gold_score"]["mean"] for r in rounds]
            lows = [m - r["gold_score"]["ci95"][0] for m, r in zip(means, rounds)]
            left.errorbar(numbers, means, yerr=lows, marker="o", capsize=3)
        left.set(xlabel="round", ylabel="gold score (held-out, 95% CI)")
        for name in ("proxy_accuracy_before", "proxy_accuracy_after"):
            values = [r[name] for r in rounds]
            if all(v is not None for v in values):
                right.plot(numbers, values, marker="o", label=name.removeprefix("proxy_accuracy_"))
        right.set(xlabel="round", ylabel="proxy RM accuracy on the round's pairs")
        if rounds:
            right.legend()
    (work_dir / "README.md").write_text(readme(report, args))
    return report


def _number(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        low, high = value["ci95"]
        return f"{value['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    return f"{value:.{digits}f}"


def readme(report: dict, args: Args) -> str:
    """The work dir's README: one table row per round, then the time per step."""
    lines = [
        "# Online RLHF loop",
        "",
        f"Started from release {report['setup']['version']} ({report['setup']['release']}); "
        f"labeller `{args.labeller}`, tau {args.tau}, {args.comparisons_per_round} comparisons "
        f"per round, seed {args.seed}.",
        "",
        "| round | version | pairs | proxy acc. before | after | gold agreement | gold score "
        "[95% CI] | win rate vs previous | KL to SFT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rounds"]:
        lines.append(
            f"| {r['round']} | {r['version']} | {r['pairs']} | "
            f"{_number(r['proxy_accuracy_before'])} | {_number(r['proxy_accuracy_after'])} | "
            f"{_number(r['gold_agreement'])} | {_number(r.get('gold_score'))} | "
            f"{_number(r.get('win_rate_vs_previous'))} | {_number(r['kl_to_reference'])} |"
        )
    lines += ["", "Seconds per step:", "", "| round | " + " | ".join(STEPS) + " |"]
    lines.append("|---" * (len(STEPS) + 1) + "|")
    for r in report["rounds"]:
        lines.append(
            f"| {r['round']} | " + " | ".join(f"{r['seconds'][s]:.1f}" for s in STEPS) + " |"
        )
    return "\n".join(lines) + "\n\n![rounds](rounds.png)\n"


if __name__ == "__main__":
    run_cli(main, Args)
