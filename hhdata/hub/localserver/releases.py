"""Small real releases for the Hub tests, built with hhdata.release from the bundled sample.

Rows come from the bundled harmless-base test split. So that a release has both families,
every odd record is filed under a test-only subset ``helpful-fixture`` declared
``helpful``: the rows are real transcripts, only the label is made up for the test.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from hhdata.errors import PairError
from hhdata.pairs.transcript import split_pair
from hhdata.release.write import write_release
from hhdata.schema import PAIR_SCHEMA, pair_id

SAMPLE = (
    Path(__file__).resolve().parents[2] / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
)


def sample_pairs(count: int, offset: int = 0) -> pa.Table:
    """`count` canonical pair rows from the bundled sample, starting at record `offset`."""
    rows = []
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if number < offset:
                continue
            if len(rows) == count:
                break
            record = json.loads(line)
            try:
                pair = split_pair(record["chosen"], record["rejected"])
            except PairError:
                continue
            helpful = number % 2 == 1  # fixed per record, so a bigger count only adds rows
            rows.append(
                {
                    "id": pair_id(record["chosen"], record["rejected"]),
                    "subset": "helpful-fixture" if helpful else "harmless-base",
                    "family": "helpful" if helpful else "harmless",
                    "split": "test" if number % 4 < 2 else "train",
                    "prompt": pair.prompt,
                    "chosen": pair.chosen,
                    "rejected": pair.rejected,
                    "chosen_text": record["chosen"],
                    "rejected_text": record["rejected"],
                    "flags": list(pair.flags),
                }
            )
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


def build_release(
    out: Path,
    version: str,
    count: int = 24,
    previous: Path | None = None,
    added: int = 0,
    drop: str | None = None,
) -> Path:
    """Write ``<out>/<version>/`` with `count` rows and return its path.

    `added` more records, taken after the first `count`, go into a new subset
    ``harmless-added``, so the files of the other subsets stay byte-identical to a release
    built with the same `count` (a minor version that only adds a batch). `drop` leaves one
    subset out (a major version that removes it).
    """
    pairs = sample_pairs(count)
    if drop:
        pairs = pairs.filter(pc.not_equal(pairs["subset"], drop))
    if added:
        extra = sample_pairs(added, offset=count + 8).to_pylist()
        for row in extra:
            row.update(subset="harmless-added", family="harmless")
        pairs = pa.concat_tables([pairs, pa.Table.from_pylist(extra, schema=PAIR_SCHEMA)])
    accounting = {
        "read": pairs.num_rows,
        "kept": pairs.num_rows,
        "quarantined": {},
        "removed": {},
        "filtered": {},
    }
    sources = [
        {"path": "harmless-base/test.jsonl.gz", "sha256": "0" * 64, "bytes": SAMPLE.stat().st_size}
    ]
    release = write_release(
        pairs,
        out,
        version,
        sources=sources,
        accounting=accounting,
        settings={},
        previous=previous,
        allow_version_mismatch=previous is None,
    )
    return release.path
