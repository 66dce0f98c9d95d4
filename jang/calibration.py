"""Calibration text: real English, tokenized into fixed-length chunks, deterministic.

Jane Austen's novels split in two: calibration reads the four below, evaluation
(jang.evaluate) reads Pride and Prejudice and Persuasion. They never overlap.
Users may pass their own text files instead.
"""

from pathlib import Path

from .data import paragraphs

CALIBRATION_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "sensesensibility")


def adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer.encode("a")
    return bos is not None and len(ids) > 0 and ids[0] == bos


def token_chunks(tokenizer, texts, n_chunks: int, chunk: int):
    """n_chunks chunks of chunk tokens, spread evenly over the token stream of texts.
    Models whose tokenizer adds BOS (Gemma) get BOS at the start of every chunk."""
    bos = adds_bos(tokenizer)
    stream = []
    for text in texts:
        ids = tokenizer.encode(text)
        stream.extend(ids[1:] if bos else ids)
    body = chunk - 1 if bos else chunk
    available = len(stream) // body
    if available < n_chunks:
        raise ValueError(f"calibration text has {len(stream)} tokens: too few for {n_chunks} chunks of {chunk}")
    step = available // n_chunks
    prefix = [tokenizer.bos_token_id] if bos else []
    return [prefix + stream[i * step * body: i * step * body + body] for i in range(n_chunks)]


def calibration_chunks(tokenizer, n_chunks: int = 32, chunk: int = 128, text_files=None):
    """Chunks from user text files, or from the calibration novels by default."""
    if text_files:
        texts = [Path(f).read_text() for f in text_files]
    else:
        texts = ["\n\n".join(paragraphs(book)) for book in CALIBRATION_BOOKS]
    return token_chunks(tokenizer, texts, n_chunks, chunk)
