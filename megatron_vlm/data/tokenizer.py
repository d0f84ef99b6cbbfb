"""Tokenizers loaded from a local file: a Hugging Face ``tokenizer.json`` or a sentencepiece ``.model``.

Both kinds present the same small interface (:class:`Tokenizer`). Encoding never adds special
tokens: no BOS, and no EOS either; the data tools append :attr:`Tokenizer.eos_id` after every
document themselves, as the DCLM recipe does (GPT-NeoX BPE, ``<|endoftext|>`` ends each document).

This module imports neither torch nor megatron-core, so tokenizer worker processes start fast.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

# Tokens tried, in order, as the end-of-document token of a ``tokenizer.json``.
HF_EOS_CANDIDATES = ("<|endoftext|>", "</s>")
# Token tried for a sentencepiece model whose ``eos_id`` is disabled (-1).
SP_EOS_FALLBACK = "</s>"


class Tokenizer:
    """The interface every loaded tokenizer offers.

    Attributes:
        path: the file it was loaded from.
        kind: ``"hf"`` (tokenizers ``tokenizer.json``) or ``"sentencepiece"``.
        vocab_size: the full vocabulary, added/special tokens included (the model's embedding
            table needs at least this many rows; it may be padded beyond).
        eos_id: the end-of-document token id.
    """

    path: str
    kind: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no BOS and no EOS added."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text (faster than a Python loop for both backends)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids`` (special tokens are kept in the text)."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of one vocabulary entry, or None when ``token`` is not in the vocabulary."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id})")


class HFTokenizer(Tokenizer):
    """A tokenizer from a Hugging Face ``tokenizers`` ``tokenizer.json`` file."""

    kind = "hf"

    def __init__(self, path: str, eos_token: Optional[str] = None):
        from tokenizers import Tokenizer as _RustTokenizer

        self.path = path
        try:
            self._tok = _RustTokenizer.from_file(path)
        except Exception as err:  # the Rust side raises a plain Exception on bad JSON
            raise ValueError(f"{path}: not a readable tokenizers tokenizer.json ({err})") from err
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        candidates = (eos_token,) if eos_token else HF_EOS_CANDIDATES
        for token in candidates:
            tid = self._tok.token_to_id(token)
            if tid is not None:
                self.eos_id = int(tid)
                self.eos_token = token
                break
        else:
            raise ValueError(f"{path}: no end-of-document token found (looked for "
                             f"{', '.join(repr(c) for c in candidates)}); pass eos_token=... "
                             f"naming the tokenizer's EOS token")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        tid = self._tok.token_to_id(token)
        return None if tid is None else int(tid)


class SentencePieceTokenizer(Tokenizer):
    """A tokenizer from a sentencepiece ``.model`` file."""

    kind = "sentencepiece"

    def __init__(self, path: str, eos_token: Optional[str] = None):
        import sentencepiece as spm

        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as err:
            raise ValueError(f"{path}: not a readable sentencepiece model ({err})") from err
        self.vocab_size = int(self._sp.get_piece_size())
        if eos_token:
            tid = self.token_to_id(eos_token)
            if tid is None:
                raise ValueError(f"{path}: eos_token {eos_token!r} is not in the vocabulary")
            self.eos_id = tid
        elif self._sp.eos_id() >= 0:
            self.eos_id = int(self._sp.eos_id())
        else:
            tid = self.token_to_id(SP_EOS_FALLBACK)
            if tid is None:
                raise ValueError(f"{path}: the model has no eos id (eos_id=-1) and no "
                                 f"{SP_EOS_FALLBACK!r} piece; pass eos_token=... naming one")
            self.eos_id = tid
        self.eos_token = self._sp.id_to_piece(self.eos_id)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int, add_bos=False, add_eos=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, add_bos=False, add_eos=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> Optional[int]:
        tid = self._sp.piece_to_id(token)
        # piece_to_id answers the unknown id for anything not in the vocabulary.
        if tid == self._sp.unk_id() and token != self._sp.id_to_piece(tid):
            return None
        return int(tid)


def load_tokenizer(path: str | os.PathLike, eos_token: Optional[str] = None) -> Tokenizer:
    """Loads a local ``tokenizer.json`` (any ``.json``) or sentencepiece ``.model`` file.

    ``eos_token`` overrides the end-of-document token (default: ``<|endoftext|>``, then
    ``</s>`` for tokenizer.json; the model's eos id, then ``</s>``, for sentencepiece).
    Raises FileNotFoundError naming a missing path and ValueError for an unsupported file.
    """
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    lower = path.lower()
    if lower.endswith(".json"):
        return HFTokenizer(path, eos_token)
    if lower.endswith(".model"):
        return SentencePieceTokenizer(path, eos_token)
    raise ValueError(f"{path}: unsupported tokenizer file (expected a tokenizers "
                     f"'tokenizer.json' or a sentencepiece '.model')")
