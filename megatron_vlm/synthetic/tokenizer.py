"""Trains the ShapesWorld tokenizers on the generated text.

``tokenizer.json``: the project's byte-level BPE (:func:`megatron_vlm.data.tokenizer_training.
train_bpe`, the one ``tools/train_tokenizer.py`` trains), whose id 0 is ``<|endoftext|>`` (the
end-of-document token, as in GPT-NeoX) and id 1 is ``<|sep|>`` (the separator between an image
and its caption, and after every conversation turn). No BOS is added and no post-processing is
applied, so ``decode(encode(text)) == text`` for any text.

``tokenizer.model`` (optional): a sentencepiece BPE of the same vocabulary size with the same
two special pieces at ids 0 and 1 (``<unk>`` at 2) and byte fallback, also lossless.
"""

from __future__ import annotations

import io
from typing import Iterable

from megatron_vlm.data.tokenizer_training import EOS, SEP, train_bpe

__all__ = ["EOS", "SEP", "train_bpe", "train_sentencepiece"]


def train_sentencepiece(texts: Iterable[str], vocab_size: int = 512) -> bytes:
    """Returns a serialized sentencepiece BPE model (ids: EOS 0, SEP 1, unk 2; no BOS)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True,
        eos_id=0, eos_piece=EOS, user_defined_symbols=[SEP], unk_id=2, bos_id=-1, pad_id=-1,
        num_threads=1, minloglevel=2, max_sentence_length=1 << 16)
    return buf.getvalue()
