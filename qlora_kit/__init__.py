"""qlora-kit: QLoRA fine-tuning that tells you whether it fits before it starts."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes' CPU backend warns at import that an optional hub-downloaded kernel is missing; its built-in
# fallback is what runs offline anyway, so the warning only confuses; so does the kernels package (which
# transformers 5.25 brings) saying, offline, that it skips checking that kernel's publisher.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
_logging.getLogger("kernels").setLevel(_logging.ERROR)
