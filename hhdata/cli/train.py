"""`hhdata train TRAINER [flags]`: the reference trainers and tools, from the one command.

TRAINER is reward-model, sft, ppo, dpo, best-of-n, evaluate or online.

Each verb runs ``python -m training.<module>`` with the flags that follow it, untouched, so its
help, flags and exit codes are the trainer's own. The trainers need the `train` extra (torch,
transformers, accelerate); without it the verb says so in one line and exits 2. Nothing here
imports torch: ``hhdata --help`` stays fast on a data-only install.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

from hhdata.cli._signals import Terminated
from hhdata.errors import HhDataError

# verb -> (module run by `python -m`, one line of help)
TRAINERS = {
    "reward-model": ("training.reward_model", "a Bradley-Terry reward model on a release"),
    "sft": ("training.sft", "supervised fine-tuning on the chosen replies (PPO's start)"),
    "ppo": ("training.ppo", "PPO of an SFT policy against a reward model"),
    "dpo": ("training.dpo", "DPO of an SFT policy on the pairs, no reward model"),
    "best-of-n": ("training.best_of_n", "N replies per prompt, the best by a reward model"),
    "evaluate": ("training.evaluate", "policies side by side: judge, KL, lm_eval tasks"),
    "online": ("training.online", "rounds of sample, label, release, retrain"),
}
# what `pip install 'hhdata[train]'` adds that the trainers cannot start without
TRAIN_EXTRA = ("torch", "transformers", "accelerate")
INSTALL_HINT = "pip install 'hhdata[train]'"
# how long an interrupted trainer may take to stop before it is killed
_TRAINER_STOP_SECONDS = 60


class TrainExtraMissing(HhDataError):
    """The `train` extra (torch, transformers, accelerate) is not installed."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the train verb with one sub-verb per trainer."""
    train = subparsers.add_parser(
        "train",
        help="reward model, SFT, PPO, DPO, best-of-N, evaluation, online loop (hhdata[train])",
        description="Run a reference trainer on a release. The flags after the trainer's name "
        "go to it unchanged: `hhdata train sft --help` lists them. `hhdata train X` is "
        "`python -m training.X` with - as _ (reward_model, sft, ppo, dpo, best_of_n, evaluate, "
        "online). Needs the train extra: "
        f"{INSTALL_HINT}.",
        epilog="Example: hhdata train reward-model --data releases/1.0.0 --run-dir runs/rm",
        formatter_class=_WideHelp,
    )
    trainers = train.add_subparsers(dest="trainer", metavar="TRAINER", required=True)
    for verb, (module, summary) in TRAINERS.items():
        trainer = trainers.add_parser(
            verb,
            help=summary,
            add_help=False,  # --help goes to the trainer, which lists its own flags
            prefix_chars="\0",  # every flag after the verb is the trainer's, passed on in order
        )
        trainer.add_argument("argv", nargs=argparse.REMAINDER)
        trainer.set_defaults(func=run_train, module=module)


class _WideHelp(argparse.HelpFormatter):
    """Room for `reward-model` and its help on one line (argparse measures the sub-verbs one
    indent short)."""

    def __init__(self, prog: str):
        super().__init__(prog)
        self._action_max_length = 4 + max(map(len, TRAINERS))


def missing_train_extra() -> list[str]:
    """The packages of the train extra that cannot be found (found without importing them)."""
    return [name for name in TRAIN_EXTRA if importlib.util.find_spec(name) is None]


def run_train(args) -> int:
    """Run `python -m <module> <argv>` with this interpreter; its exit code is ours."""
    missing = missing_train_extra()
    if missing:
        raise TrainExtraMissing(
            f"the trainers need {', '.join(missing)}, which this environment lacks; "
            f"install them with {INSTALL_HINT}"
        )
    command = [sys.executable, "-m", args.module, *args.argv]
    trainer = subprocess.Popen(command)
    try:
        return trainer.wait()
    except KeyboardInterrupt as stop:
        # Ctrl-C reaches the trainer too (the terminal signals the whole process group);
        # SIGTERM reached only this process: pass it on. Then give the trainer time to stop
        # as it chooses (a checkpoint), and kill it only after that or on a second Ctrl-C
        if isinstance(stop, Terminated):
            trainer.terminate()
        try:
            trainer.wait(timeout=_TRAINER_STOP_SECONDS)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            trainer.kill()
            trainer.wait()
        raise
