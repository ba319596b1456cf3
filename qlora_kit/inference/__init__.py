"""Inference: a trained adapter put to use: `generate` and `chat` (chat.py), `eval` (evaluation.py).

Imports: adapter/, objectives/ (the same loss for evaluation) and everything below; never train/.
"""
