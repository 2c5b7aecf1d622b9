"""The modernbert family: config.py (config class + presets), model.py (flax module), hf.py (HF weight table)."""
