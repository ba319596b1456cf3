"""Objectives: what a micro-batch costs, as one module that data parallelism can wrap.

sft.py is the next-token loss, computed in chunks against the head so no full logits are held; preference.py
is DPO and ORPO over chosen and rejected answers. Imports: model/, data/, plan/, probe/ and the shared modules.
"""
