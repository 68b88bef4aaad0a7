"""Checkpoint sources (Hugging Face folders, GGUF files) and the converter to lilmistral's packed format."""
