"""The torch engine: Harness (harness.py: reference, compress, run), its curves (curves.py) and extra passes
(extras.py: anatomy, probes, noise), and a saved compressed checkpoint measured as a method (checkpoint.py)."""
