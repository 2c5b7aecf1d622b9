"""Text generation: sampling, KV-cache decoding for decoders, encoder-decoder decoding.

    sampling.py          sample_logits (greedy, temperature, top-k, top-p), clamp_vocab
    decoder.py           the compiled KV-cache decode loop of decoder-only models
    encoder_decoder.py   the compiled decode loop of encoder-decoders (T5): encode once, decode
    generation.py        generate(): checks the request, picks the loop from the family record
"""

from zoo.inference.generation import generate
from zoo.inference.sampling import clamp_vocab, sample_logits

__all__ = ["generate", "clamp_vocab", "sample_logits"]
