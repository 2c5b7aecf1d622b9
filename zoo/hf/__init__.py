"""Family-agnostic Hugging Face conversion.

    rules.py        Rule, ArchSpec, the exact invertible layouts, CheckpointError, shared config helpers
    safetensors.py  streaming safetensors reads and writes
    convert.py      from_hf, to_hf, config_from_hf, config_to_hf, side files, tokenizer/generation config

Each family's weight table and config translation live beside its model, in
zoo/models/<family>/hf.py; the family record (zoo.registry) points at them.
This package init imports nothing: the family tables import zoo.hf.rules, and
zoo.hf.convert imports the registry, which imports the families.
"""
