"""Stage 4, release: a versioned directory of Parquet files with card, manifest and changelog.

write (the release directory), card (README.md), manifest (manifest.json and its checks),
croissant (croissant.json), diff (versions and the changelog), load (a release back as
datasets).
"""

from hhdata.release.write import ParquetSettings, Release, data_file, write_data_files, write_release

__all__ = ["ParquetSettings", "Release", "data_file", "write_data_files", "write_release"]
