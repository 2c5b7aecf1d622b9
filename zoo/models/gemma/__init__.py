"""Gemma 2 and Gemma 3 (text): the Llama decoder with sandwich norms, local/global layers and soft caps."""
