"""zoo.data: sources, tokenizers, packing with segment ids/positions, determinism,
resumable iterator state, per-process sharding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zoo import data


class CharTokenizer:
    """Byte-level stand-in: token = byte value + 4, EOS = 3."""

    vocab_size = 260
    eos_id = 3

    def encode(self, text):
        return [b + 4 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 4 for i in ids if i >= 4).decode()


def _letter_docs(n=20):
    # document i is one repeated letter, so every token says which document it came from
    return [chr(ord("a") + i) * (3 + 2 * i) for i in range(n)]


def _batches(ds_or_it, n):
    it = iter(ds_or_it)
    return [next(it) for _ in range(n)]


def test_restart_positions():
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 2, 2, 2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(data.restart_positions(seg),
                                  [[0, 1, 2, 0, 1, 0, 0, 0], [0, 0, 1, 2, 3, 4, 5, 6]])


def test_packed_rows_hold_whole_ordered_documents():
    docs = _letter_docs()
    ds = data.text_dataset(docs, CharTokenizer(), seq_len=16, batch_size=4, seed=0)
    for batch in _batches(ds, 10):
        assert set(batch) == {"input_ids", "segment_ids", "positions"}
        for ids, seg, pos in zip(batch["input_ids"], batch["segment_ids"], batch["positions"]):
            assert ids.shape == (16,) and ids.dtype == np.int32
            assert seg[0] == 1 and np.all(np.diff(seg[seg > 0]) >= 0)  # 1, 2, 3... in order
            for s in np.unique(seg[seg > 0]):
                piece = ids[seg == s]
                np.testing.assert_array_equal(pos[seg == s], np.arange(len(piece)))
                body = piece[piece != CharTokenizer.eos_id]
                assert len(set(body.tolist())) <= 1  # one document per segment
                assert np.all(piece[:-1] != CharTokenizer.eos_id)  # EOS only ends a document
            assert np.all(ids[seg == 0] == 0) and np.all(pos[seg == 0] == 0)


def test_pipeline_is_deterministic_and_seeded():
    docs = _letter_docs()
    a = _batches(data.text_dataset(docs, CharTokenizer(), seq_len=16, batch_size=2, seed=3), 8)
    b = _batches(data.text_dataset(docs, CharTokenizer(), seq_len=16, batch_size=2, seed=3), 8)
    c = _batches(data.text_dataset(docs, CharTokenizer(), seq_len=16, batch_size=2, seed=4), 8)
    assert all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_iterator_state_resumes_exactly_through_json():
    ds = data.text_dataset(_letter_docs(), CharTokenizer(), seq_len=16, batch_size=2, seed=0)
    it = data.DataIterator(ds)
    for _ in range(10):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(6)]  # crosses an epoch boundary too
    resumed = data.DataIterator(ds)
    resumed.set_state(state)
    for x, y in zip(expected, (next(resumed) for _ in range(6))):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_processes_read_disjoint_documents():
    docs = _letter_docs(10)
    seen = []
    for p in range(2):
        ds = data.text_dataset(docs, CharTokenizer(), seq_len=8, batch_size=2, seed=0, process_index=p,
                               process_count=2)
        ids = np.concatenate([b["input_ids"].ravel() for b in _batches(ds, 20)])
        seen.append({chr(i - 4) for i in ids.tolist() if i >= 4})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {d[0] for d in docs}


def test_document_source_reads_text_jsonl_and_dirs(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    (sub / "ignored.bin").write_bytes(b"\0")
    src = data.DocumentSource([str(tmp_path)])
    assert [src[i] for i in range(len(src))] == ["first document\n", "second", "third"]
    assert len(data.DocumentSource([str(tmp_path)], max_bytes=5)) == 1  # the cap stops indexing
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.DocumentSource([str(tmp_path / "missing")])


def test_long_text_files_split_at_line_ends(tmp_path):
    text = "".join(f"line {i} " + "x" * (i % 7) + "\n" for i in range(40))
    (tmp_path / "long.txt").write_text(text)
    src = data.DocumentSource([str(tmp_path)], split_bytes=50)
    pieces = [src[i] for i in range(len(src))]
    assert len(pieces) > 5 and "".join(pieces) == text
    assert all(len(p) <= 50 and p.endswith("\n") for p in pieces)


def test_stdlib_corpus_is_fixed_and_capped():
    a = data.DocumentSource([data.STDLIB], max_bytes=200_000)
    b = data.DocumentSource([data.STDLIB], max_bytes=200_000)
    assert a.files[: len(a)] == b.files[: len(b)] and 0 < len(a) < 200
    assert all(f.endswith(".py") for f in a.files)


def test_sentencepiece_trained_on_corpus_round_trips_code(tmp_path):
    code = "def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n"
    docs = [code * 20, "import os\nprint(os.getcwd())\n" * 20]
    tok = data.train_tokenizer(docs, tmp_path / "tok.model", vocab_size=512)
    loaded = data.Tokenizer(tmp_path / "tok.model")
    assert loaded.vocab_size == tok.vocab_size <= 512 and loaded.eos_id == 3
    assert loaded.decode(loaded.encode(code)) == code  # newlines and indentation survive
    assert len(loaded.encode(code)) < len(code) / 2  # BPE merges, not characters


def test_hf_tokenizer_json_loads(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["hello world, hello tokens"] * 50, trainer)
    from tokenizers import decoders

    hf.decoder = decoders.ByteLevel()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = data.Tokenizer(tmp_path / "tokenizer.json")
    assert tok.eos_id == 1 and tok.vocab_size == hf.get_vocab_size()
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_synthetic_iterator_resumes():
    it = data.SyntheticIterator(vocab_size=50, seq_len=8, batch_size=2, seed=0)
    next(it)
    state = it.get_state()
    a = next(it)
    it2 = data.SyntheticIterator(vocab_size=50, seq_len=8, batch_size=2, seed=0)
    it2.set_state(state)
    np.testing.assert_array_equal(a["input_ids"], next(it2)["input_ids"])
    assert a["input_ids"].max() < 50 and np.all(a["segment_ids"] == 1)
