"""Stage 5, gate: stored baselines (baselines.py: atomic, locked updates with provenance) and the one rule that
compares a run with them (check.py: KL and growth cases, and check_claim for the claims' verdicts)."""
