"""Collect human feedback: a web app where people chat with a policy and compare two replies.

``db`` is the SQLite store, ``export`` writes the comparisons as raw HH-RLHF JSONL, ``app``
is the web app (needs the ``feedback`` extra). See docs/feedback.md.
"""
