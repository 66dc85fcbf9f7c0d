"""Stage 4, measure: THE KL definition and the per-position statistics (kl.py), the chunked LM head (head.py), which
passes a curve needs (design.py), the cached reference (reference.py), the long-range probes (probes.py,
probe_scores.py), the error anatomy (anatomy.py), growth with context per sample (growth.py) and the
statistics the verdicts use (stats.py)."""
