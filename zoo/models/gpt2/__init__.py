"""The gpt2 family: model.py (flax module) and hf.py (HF weight table)."""
