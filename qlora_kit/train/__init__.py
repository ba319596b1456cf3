"""Train: a run, from its folder to its adapter, and the loop at its heart.

run.py is a run in the order it happens (run_training); loop.py the training loop (its state, its hooks, the
out-of-memory step-down); checkpoint.py and run_folder.py what lands on disk, and how a run resumes exactly;
dashboard.py the live view and metrics.jsonl; signals.py Ctrl-C; distributed.py several GPUs; trackers.py
--report-to; report.py `qlora-kit report` on run folders. Imports: objectives/, adapter/ and everything below.
"""
