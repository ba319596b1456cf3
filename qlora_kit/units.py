"""Units the whole package shares. It imports nothing, so every step of the flow may import it."""

GIB = 2**30  # a gibibyte: every memory figure qlora-kit shows is in GiB
