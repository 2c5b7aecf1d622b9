"""zoo.data.text: framing per model kind (read from zoo.registry), vocabulary lookups, padded rows."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

import zoo
from zoo import data

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "a", "mat"]


def _word_tokenizer(tmp_path) -> data.Tokenizer:
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return data.Tokenizer(tmp_path / "tokenizer.json")


def test_piece_id_and_token_id(tmp_path):
    tok = _word_tokenizer(tmp_path)
    assert tok.piece_id("[CLS]") == 2 and tok.piece_id("<s>") is None
    assert data.token_id(tok, "<s>", "[SEP]") == 3  # the first piece the vocabulary holds
    assert data.token_id(tok, "<s>", "</s>") is None
    sp = data.train_tokenizer(["the cat sat on the mat\n" * 50], tmp_path / "sp.model", vocab_size=300)
    assert sp.piece_id("</s>") == 3 and sp.piece_id("<unk>") == 1
    assert sp.piece_id("[CLS]") is None  # unknown pieces are not the unk id


def test_frame_follows_the_model_kind(tmp_path):
    tok = _word_tokenizer(tmp_path)
    text = "the cat sat on a mat"  # 4 5 6 7 8 9
    bert, t5, llama = zoo.config("tiny-bert"), zoo.config("tiny-t5"), zoo.config("tiny-llama")
    assert data.frame(tok, bert, text, 5) == [2, 4, 5, 6, 3]  # [CLS] ... [SEP], both kept when truncating
    assert data.frame(tok, bert, text, 100, role="target") == [4, 5, 6, 7, 8, 9]
    assert data.frame(tok, t5, text, 4) == [4, 5, 6, t5.eos_token_id]
    assert data.frame(tok, t5, text, 100, role="target") == [4, 5, 6, 7, 8, 9, t5.eos_token_id]
    assert data.frame(tok, llama, text, 3) == [4, 5, 6]


def test_decode_known_and_pad_rows(tmp_path):
    tok = _word_tokenizer(tmp_path)
    assert data.decode_known(tok, [4, 5, 500, -1]) == tok.decode([4, 5])
    ids, seg = data.pad_rows([[4, 5, 6], [7]], 4, rows=3)
    np.testing.assert_array_equal(ids, [[4, 5, 6, 0], [7, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(seg, [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert ids.dtype == seg.dtype == np.int32
