"""qlora-kit: QLoRA fine-tuning that tells you whether it fits before it starts."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes' CPU backend warns at import that an optional hub-downloaded kernel is missing; its built-in
# fallback is what runs offline anyway, so the warning only confuses.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
