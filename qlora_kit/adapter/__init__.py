"""Adapter: a trained LoRA adapter as a folder on disk (a plain PEFT adapter), written and read back.

folder.py writes the adapter with its card and the base's identity, checks it against a base, and loads a base
with adapters for the steps after training. Imports: model/ and everything below it.
"""
