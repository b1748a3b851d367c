"""Descriptive statistics of a pair table: rows, turns, lengths and flags, per subset.

All computed column-wise with pyarrow.compute; ``format_stats`` prints them as a table.
The measures are those of a release's manifest and card (hhdata.release.manifest.length_stats):
the mean to one decimal, and the median, p90 and p99 as the lower percentile (numpy's
``method="lower"``, so each is a length that occurs; the median is the lower median), so
``hhdata stats`` of raw files and the card of their release print the same figures.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hhdata.pairs.transcript import FLAGS
from hhdata.schema import ALL


def pair_stats(pairs: pa.Table) -> dict[str, dict]:
    """Statistics of a pair table, for all rows and for each subset (split by split).

    >>> from hhdata.load import load
    >>> stats = pair_stats(load(split="test").data.table)
    >>> stats["all"]["rows"], stats["harmless-base"]["splits"]
    (2312, {'test': 2312})
    """
    result = {ALL: _stats(pairs)}
    for subset in sorted(pc.unique(pairs["subset"]).to_pylist()):
        result[subset] = _stats(pairs.filter(pc.equal(pairs["subset"], subset)))
    return result


def _stats(pairs: pa.Table) -> dict:
    rows = pairs.num_rows
    turns = pc.list_value_length(pairs["prompt"]).to_numpy(zero_copy_only=False)
    prompt_chars = np.zeros(rows, dtype=np.int64)
    if rows:
        prompt = pairs["prompt"].combine_chunks()
        contents = pc.utf8_length(pc.list_flatten(prompt).field("content")).to_numpy(
            zero_copy_only=False
        )
        prompt_chars = np.bincount(
            pc.list_parent_indices(prompt).to_numpy(), contents, minlength=rows
        ).astype(np.int64)
    return {
        "rows": rows,
        "splits": dict(
            sorted((c["values"], c["counts"]) for c in pc.value_counts(pairs["split"]).to_pylist())
        ),
        "prompt_turns": _summary(turns),
        "prompt_chars": _summary(prompt_chars),
        "chosen_chars": _summary(_reply_lengths(pairs["chosen"])),
        "rejected_chars": _summary(_reply_lengths(pairs["rejected"])),
        "flags": flag_counts(pairs),
    }


def flag_counts(pairs: pa.Table) -> dict[str, int]:
    """Rows per flag of a pair table, in the order of hhdata.pairs.transcript.FLAGS; absent flags
    are left out."""
    counts = pc.value_counts(pc.list_flatten(pairs["flags"])).to_pylist()
    found = {count["values"]: count["counts"] for count in counts}
    return {flag: found[flag] for flag in FLAGS if flag in found}


def _reply_lengths(replies: pa.ChunkedArray) -> np.ndarray:
    contents = pc.struct_field(pc.list_flatten(replies.combine_chunks()), "content")
    return pc.utf8_length(contents).to_numpy(zero_copy_only=False)


MEASURES = ("mean", "median", "p90", "p99", "max")


def _summary(values: np.ndarray) -> dict[str, float]:
    """mean (one decimal), lower median, p90, p99 and max of a column (zeros when empty).

    >>> _summary(np.array([1, 2, 3, 10]))
    {'mean': 4.0, 'median': 2, 'p90': 3, 'p99': 3, 'max': 10}
    """
    if len(values) == 0:
        return {"mean": 0.0, "median": 0, "p90": 0, "p99": 0, "max": 0}
    median, p90, p99 = np.percentile(values, [50, 90, 99], method="lower")
    return {
        "mean": round(float(values.mean()), 1),
        "median": int(median),
        "p90": int(p90),
        "p99": int(p99),
        "max": int(values.max()),
    }


def format_stats(stats: dict[str, dict]) -> str:
    """The statistics as a plain-text table, one column per subset and one for all."""
    names = [name for name in stats if name != ALL] + [ALL]
    lines = [("", *names)]
    lines.append(("rows", *(f"{stats[n]['rows']:,}" for n in names)))
    splits = sorted({s for n in names for s in stats[n]["splits"]})
    for split in splits:
        lines.append((f"  {split}", *(f"{stats[n]['splits'].get(split, 0):,}" for n in names)))
    for key, label in (
        ("prompt_turns", "prompt turns"),
        ("prompt_chars", "prompt chars"),
        ("chosen_chars", "chosen chars"),
        ("rejected_chars", "rejected chars"),
    ):
        for measure in MEASURES:
            shown = "{:,.1f}" if measure == "mean" else "{:,}"
            lines.append(
                (f"{label} {measure}", *(shown.format(stats[n][key][measure]) for n in names))
            )
    flags = [flag for flag in FLAGS if any(flag in stats[n]["flags"] for n in names)]
    for flag in flags:
        lines.append((f"flag {flag}", *(f"{stats[n]['flags'].get(flag, 0):,}" for n in names)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(line)
        ).rstrip()
        for line in lines
    )
