"""Stage 1, reading: raw HH JSONL(.gz) files into validated tables, bad lines quarantined.

lines (bytes to lines), validate (the raw-record schema), read (files to raw rows or pairs),
redteam (the red-team attempts, their own schema).
"""

# the longest line read_raw accepts (the longest real record is about 16 KB); here, not in
# read, so that the command line's help can show it without importing Arrow
MAX_LINE_BYTES = 4 * 2**20
