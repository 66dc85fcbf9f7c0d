"""Stage 6, verdicts: the paper's claims judged on the curves (claims.py: the claims registry, each claim's
parts as paired contrasts with intervals, the verdict rule)."""
