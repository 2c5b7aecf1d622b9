"""Tokenizers: a sentencepiece `.model` or a Hugging Face `tokenizer.json` behind one interface,
and training a sentencepiece BPE model on a corpus."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer


class Tokenizer:
    """A sentencepiece `.model` or a Hugging Face `tokenizer.json` behind one interface."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if self.path.endswith(".json"):
            self._hf = HFTokenizer.from_file(self.path)
            self._sp = None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            vocab = self._hf.get_vocab(with_added_tokens=True)
            eos = [vocab[t] for t in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]") if t in vocab]
            self.eos_id = eos[0] if eos else None
        else:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
            self._hf = None
            self.vocab_size = self._sp.get_piece_size()
            self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids."""
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids)

    def piece_id(self, piece: str) -> int | None:
        """Id of the vocabulary entry `piece` (e.g. "[CLS]"), or None when the vocabulary lacks it."""
        if self._sp is None:
            return self._hf.token_to_id(piece)
        i = self._sp.piece_to_id(piece)
        return None if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i) else i


def _training_chunks(source: Sequence[str], max_bytes: int, chunk_bytes: int = 2000) -> Iterator[str]:
    """Line-aligned chunks (newlines kept) of the first `max_bytes` of the corpus."""
    seen = 0
    for i in range(len(source)):
        buf = ""
        for line in source[i].splitlines(keepends=True):
            if buf and len(buf) + len(line) > chunk_bytes:
                yield buf
                buf = ""
            buf += line[: chunk_bytes * 2]
            seen += len(line)
        if buf:
            yield buf
        if seen >= max_bytes:
            return


def train_tokenizer(source: Sequence[str], out_path: str | os.PathLike, vocab_size: int,
                    max_bytes: int = 3_000_000) -> Tokenizer:
    """Trains a sentencepiece BPE model on (at most `max_bytes` of) the corpus; saves it at `out_path`.

    Whitespace is kept verbatim (identity normalisation, newline a piece of its own,
    byte fallback), so code and prose decode back exactly. Ids: pad 0, unk 1, bos 2,
    eos 3. The vocabulary may come out smaller than asked when the corpus is small.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_chunks(source, max_bytes), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, byte_fallback=True, user_defined_symbols=["\n"],
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False, max_sentence_length=8192,
        input_sentence_size=50_000, shuffle_input_sentence=False, num_threads=max(1, min(4, os.cpu_count() or 1)),
        minloglevel=2,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out_path)  # atomic: a killed run never leaves half a tokenizer behind
    return Tokenizer(out_path)
