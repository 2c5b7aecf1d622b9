"""One folder per model family: model.py (the flax module) and hf.py (its Hugging Face weight table)."""
