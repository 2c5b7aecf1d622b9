"""The moe family: model.py (flax module) and hf.py (HF weight table)."""
