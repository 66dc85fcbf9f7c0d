"""lcc-harness: guard LLM compression methods against long-context KL regressions."""

from lcc_harness._noise import quiet_known_import_noise

__version__ = "0.1.0"

quiet_known_import_noise()
