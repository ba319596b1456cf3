"""qlora-kit: QLoRA fine-tuning that tells you whether it fits before it starts."""

__version__ = "0.1.0"
