"""The llama.cpp engine: GGUF files through llama.cpp's own kernels. binding.py (the thin low-level binding),
harness.py (LlamaCppHarness), gguf_files.py (reference and compressed GGUF files, cached), kld_base.py (a
`llama-perplexity --kl-divergence-base` file as the reference)."""
