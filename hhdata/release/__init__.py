"""Stage 4, release: a versioned directory of Parquet files with card, manifest and changelog.

write (the release directory), card (README.md), manifest (manifest.json and its checks),
croissant (croissant.json), diff (versions and the changelog), load (a release back as
datasets).
"""

from hhdata.release.write import (
    ParquetSettings,
    Release,
    StagedRelease,
    data_file,
    finish_release,
    staged_release,
    write_data_files,
    write_release,
)

__all__ = [
    "ParquetSettings",
    "Release",
    "StagedRelease",
    "data_file",
    "finish_release",
    "staged_release",
    "write_data_files",
    "write_release",
]
