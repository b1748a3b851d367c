"""Stage 2, pairs: raw chosen/rejected transcripts into the canonical pair row.

transcript (the reference parser, one pair at a time), build (the same rule over whole Arrow
columns), roles (the strict user/assistant alternation filter), stats (counts over pairs).
"""

from hhdata.pairs.build import build_pairs

__all__ = ["build_pairs"]
