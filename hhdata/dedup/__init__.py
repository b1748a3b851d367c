"""Stage 3, dedup: exact and near duplicates, degenerate rows, then configs without leakage.

run (the stage: exact keys, near-duplicate sketches, survivors, the drop log), minhash (the
near-duplicate machinery), degenerate (rows too empty to learn from), configs (helpful /
harmless / all views and the train/test leakage check).
"""

from hhdata.dedup.run import (
    DedupResult,
    DedupSettings,
    DedupSettingsError,
    deduplicate,
    write_report,
)

__all__ = ["DedupResult", "DedupSettings", "DedupSettingsError", "deduplicate", "write_report"]
