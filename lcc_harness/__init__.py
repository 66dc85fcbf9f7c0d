"""lcc-harness: guard LLM compression methods against long-context KL regressions."""

__version__ = "0.1.0"
