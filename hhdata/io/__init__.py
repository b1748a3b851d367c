"""Stage 1, reading: raw HH JSONL(.gz) files into validated tables, bad lines quarantined.

lines (bytes to lines), validate (the raw-record schema), read (files to raw rows or pairs),
redteam (the red-team attempts, their own schema).
"""
