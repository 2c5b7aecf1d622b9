"""Data for training and evaluation: document sources, tokenizers, the grain pipeline, text framing.

    documents.py  DocumentSource over --data files (text, JSONL, ArrayRecord), find_files, read_jsonl
    tokenizer.py  Tokenizer (sentencepiece or tokenizer.json), train_tokenizer
    pipeline.py   text_dataset (shuffle, tokenize, pack with segment ids), DataIterator, SyntheticIterator
    text.py       frame (per model kind), token_id, decode_known, pad_rows

Callers use the names below as `zoo.data.X`.
"""

from zoo.data.documents import (
                                ARRAY_RECORD_SUFFIXES,
                                JSONL_SUFFIXES,
                                STDLIB,
                                STDLIB_MAX_BYTES,
                                TEXT_SUFFIXES,
                                DataError,
                                DocumentSource,
                                find_files,
                                read_jsonl,
                                stdlib_files,
)
from zoo.data.pipeline import BATCH_FIELDS, DataIterator, SyntheticIterator, restart_positions, text_dataset
from zoo.data.text import decode_known, frame, pad_rows, token_id
from zoo.data.tokenizer import Tokenizer, train_tokenizer

__all__ = ["ARRAY_RECORD_SUFFIXES", "JSONL_SUFFIXES", "STDLIB", "STDLIB_MAX_BYTES", "TEXT_SUFFIXES", "DataError",
           "DocumentSource", "find_files", "read_jsonl", "stdlib_files", "BATCH_FIELDS", "DataIterator",
           "SyntheticIterator", "restart_positions", "text_dataset", "decode_known", "frame", "pad_rows", "token_id",
           "Tokenizer", "train_tokenizer"]
