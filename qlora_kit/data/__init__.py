"""Data: training files read, checked, tokenized and packed into the examples a run draws from.

dataset.py reads .jsonl/.json/.csv/.parquet files and hub datasets in every format (text, prompt/completion,
chat messages, preference pairs), tokenizes them into a cached table, packs, splits and streams them, and writes
`data check`'s report. Imports: plan/ (a run's settings), probe/ and the shared modules.
"""
