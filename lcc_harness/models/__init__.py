"""Stage 1, models: load_model(spec) → LoadedModel (Hugging Face ids, local folders, GGUF files), the evaluation corpus
and its pinned samples, and Snapshot (compress the loaded model in place and put it back)."""
