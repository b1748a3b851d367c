"""Held-out evaluation of a reward model: r_chosen - r_rejected on every held-out pair, and
its accuracy, mean margin and calibration (expected calibration error, reliability diagram)
overall, per family and per subset, with plots.

Used by training.reward_model at the end of a run; an evaluation suite or a best-of-N loop can
score other pairs the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training import run
from training.fast import pair_length, pair_rewards


def summarize(margins: torch.Tensor, bins: int) -> dict:
    """Accuracy, mean margin and expected calibration error of r_chosen - r_rejected values.

    The model's probability that the chosen reply is preferred is sigmoid(margin); a pair is
    counted right when the margin is positive (a tie counts half).

    >>> summarize(torch.tensor([2.0, -1.0, 3.0, 0.0]), bins=5)["accuracy"]
    0.625
    """
    correct = (margins > 0).float() + 0.5 * (margins == 0).float()
    return {
        "pairs": len(margins),
        "accuracy": correct.mean().item(),
        "mean_margin": margins.mean().item(),
        "ece": reliability(margins, bins)[0],
    }


def reliability(margins: torch.Tensor, bins: int) -> tuple[float, list[dict]]:
    """Expected calibration error and the reliability table, over confidence max(p, 1 - p).

    Confidence lies in [0.5, 1]; each bin compares the mean confidence with the share of
    pairs whose more likely reply was the chosen one (Guo et al. 2017, eq. 3).
    """
    probability = torch.sigmoid(margins.double())
    confidence = torch.maximum(probability, 1 - probability)
    correct = (margins > 0).double() + 0.5 * (margins == 0).double()
    which = ((confidence - 0.5) * 2 * bins).long().clamp(max=bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            mean_confidence = confidence[inside].mean().item()
            accuracy = correct[inside].mean().item()
            ece += inside.double().mean().item() * abs(accuracy - mean_confidence)
            table.append(
                {
                    "low": 0.5 + b / (2 * bins),
                    "high": 0.5 + (b + 1) / (2 * bins),
                    "pairs": int(inside.sum()),
                    "confidence": mean_confidence,
                    "accuracy": accuracy,
                }
            )
    return ece, table


def evaluation_metrics(rows: list[dict], margins: torch.Tensor, bins: int) -> dict:
    """metrics.json's evaluation part: overall, per family (config) and per subset."""
    groups: dict[str, dict[str, list[int]]] = {"family": {}, "subset": {}}
    for index, row in enumerate(rows):
        for key in groups:
            groups[key].setdefault(row[key], []).append(index)
    return {
        "overall": summarize(margins, bins),
        "by_family": {
            name: summarize(margins[i], bins) for name, i in sorted(groups["family"].items())
        },
        "by_subset": {
            name: summarize(margins[i], bins) for name, i in sorted(groups["subset"].items())
        },
        "reliability": reliability(margins, bins)[1],
    }


@torch.no_grad()
def held_out_margins(
    model, pairs, pad_id: int, share_prefix: bool, batch_size: int, accelerator
) -> torch.Tensor:
    """r_chosen - r_rejected for every pair, each process scoring every world_size-th pair."""
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    padded = pairs + pairs[-1:] * (-len(pairs) % world)  # equal shares, trimmed after gather
    mine = padded[rank::world]
    # batches of similar length pad less; the margins go back to the pairs' order
    order = sorted(range(len(mine)), key=lambda i: pair_length(mine[i], share_prefix))
    margins = []
    for start in range(0, len(mine), batch_size):
        batch = [mine[i] for i in order[start : start + batch_size]]
        chosen, rejected = pair_rewards(model, batch, pad_id, share_prefix, accelerator.device)
        margins.append(chosen - rejected)
    where = torch.tensor(order).argsort().to(margins[0].device)
    gathered = accelerator.gather(torch.cat(margins)[where])  # shape: [world * share]
    model.train()
    return gathered.view(world, -1).t().reshape(-1)[: len(pairs)].cpu()


def save_plots(
    run_dir: Path, margins: torch.Tensor, rows: list[dict], metrics: dict, log: list[dict]
) -> None:
    """reliability.png, margins.png (per family) and loss.png in the run directory."""
    with run.plot(run_dir / "reliability.png", size=(4.5, 4.5)) as axis:
        table = metrics["reliability"]
        axis.plot([0.5, 1], [0.5, 1], "--", color="gray", label="perfectly calibrated")
        confidence, accuracy = [b["confidence"] for b in table], [b["accuracy"] for b in table]
        axis.plot(confidence, accuracy, "o-", label="model")
        axis.set(
            xlabel="predicted probability of the preferred reply",
            ylabel="frequency it was preferred",
            title=f"ECE {metrics['overall']['ece']:.3f}",
        )
        axis.legend()
    with run.plot(run_dir / "margins.png") as axis:
        for family in sorted({row["family"] for row in rows}):
            mine = [m for m, row in zip(margins.tolist(), rows) if row["family"] == family]
            axis.hist(mine, bins=40, alpha=0.6, label=family)
        axis.set(xlabel="r_chosen - r_rejected", ylabel="pairs", title="held-out margins")
        axis.legend()
    with run.plot(run_dir / "loss.png") as axis:
        axis.plot([r["step"] for r in log], [r["loss"] for r in log])
        axis.set(xlabel="step", ylabel="training loss", title="-log sigmoid(r_chosen - r_rejected)")
