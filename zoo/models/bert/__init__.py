"""The bert family: model.py (flax module) and hf.py (HF weight table)."""
