"""Training a byte-level BPE ``tokenizer.json`` with the special tokens the project needs.

:func:`train_tokenizer` (the logic behind ``tools/train_tokenizer.py``) trains one on a corpus of
one's own, read exactly as ``tools/preprocess_text.py`` reads it (JSONL, parquet, plain text:
:func:`megatron_vlm.data.text_preprocess.iter_documents`); :func:`train_bpe` is the training
itself, also used for ShapesWorld's tokenizer (:mod:`megatron_vlm.synthetic.tokenizer`).

The tokenizer is a byte-level BPE (Hugging Face ``tokenizers``): every text encodes, nothing is
unknown, no BOS is added and no post-processing is applied, so ``decode(encode(text)) == text``.
Its special tokens come first:

* id 0, ``<|endoftext|>``: the end of every document (the EOS the data tools append, and the
  padding of samples), at the id GPT-NeoX and DCLM give it;
* id 1, ``<|sep|>``: the separator between an image and its caption and after every
  conversation turn (``data.separator_token``'s default);
* then any extra tokens asked for, in order.

No image token is needed: an image's positions in a sample are placeholders the model fills with
patch embeddings (:mod:`megatron_vlm.data.samples`), and LLaVA's ``<image>`` marker is removed
from the text before tokenizing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field as dc_field
from typing import Iterable, Optional, Sequence

logger = logging.getLogger("megatron_vlm")

EOS = "<|endoftext|>"
SEP = "<|sep|>"
PROJECT_SPECIAL_TOKENS = (EOS, SEP)
# Below this many merges a BPE is little more than bytes; the floor only catches typos.
_MIN_MERGES = 16
# The model's vocabulary is the tokenizer's padded to a multiple of this (GPT-NeoX's 50277
# tokens are 50432 rows in DCLM), which also keeps it divisible by any tensor-parallel size
# up to 128.
_VOCAB_PAD = 128


def _special_tokens(extra: Sequence[str]) -> list[str]:
    tokens = [*PROJECT_SPECIAL_TOKENS]
    for token in extra:
        if not token:
            raise ValueError("an extra special token must not be empty")
        if token in tokens:
            raise ValueError(f"special token {token!r} is given twice (the tokenizer always has "
                             f"{', '.join(PROJECT_SPECIAL_TOKENS)})")
        tokens.append(token)
    return tokens


def _check_vocab_size(vocab_size: int, specials: Sequence[str]) -> None:
    smallest = 256 + len(specials) + _MIN_MERGES
    if vocab_size < smallest:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (256 bytes "
                         f"+ {len(specials)} special tokens + merges); use at least {smallest}")


def train_bpe(texts: Iterable[str], vocab_size: int = 512,
              extra_special_tokens: Sequence[str] = ()) -> str:
    """Returns the JSON of a byte-level BPE trained on ``texts`` (ids: EOS 0, SEP 1, extras).

    ``texts`` is consumed once, as it comes (an iterator over a large corpus is not held in
    memory; the trainer keeps word counts only). Fewer than ``vocab_size`` tokens result when
    the texts hold fewer pairs seen at least twice.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = _special_tokens(extra_special_tokens)
    _check_vocab_size(vocab_size, specials)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if [tok.token_to_id(t) for t in specials] != list(range(len(specials))):
        raise RuntimeError(f"special tokens did not get ids 0..{len(specials) - 1}")
    return tok.to_str(pretty=True)


def padded_vocab_size(vocab_size: int) -> int:
    """A ``model.decoder.vocab_size`` for a tokenizer of ``vocab_size`` tokens."""
    return -(-vocab_size // _VOCAB_PAD) * _VOCAB_PAD


@dataclass
class TokenizerTrainingSummary:
    """What :func:`train_tokenizer` did."""

    output: str
    requested_vocab_size: int
    vocab_size: int = 0
    documents: int = 0
    skipped_records: list[str] = dc_field(default_factory=list)
    special_tokens: dict[str, int] = dc_field(default_factory=dict)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [f"output: {self.output}", f"documents: {self.documents}",
               f"skipped: {len(self.skipped_records)}"]
        out += [f"  skipped {r}" for r in self.skipped_records]
        shortfall = (f" (asked for {self.requested_vocab_size}: the corpus has too few repeated "
                     f"pairs for more)" if self.vocab_size < self.requested_vocab_size else "")
        out += [f"vocab_size: {self.vocab_size}{shortfall}",
                "special tokens: " + ", ".join(f"{t}={i}" for t, i in self.special_tokens.items()),
                f"use: data.tokenizer={self.output} model.decoder.vocab_size="
                f"{padded_vocab_size(self.vocab_size)} (at least {self.vocab_size}, divisible by "
                f"parallel.tensor_parallel)",
                f"seconds: {self.seconds:.2f}"]
        return out


def train_tokenizer(inputs: Sequence[str], output: str, vocab_size: int, *, field: str = "text",
                    txt_document: str = "block", max_skips: int = 0,
                    max_documents: Optional[int] = None, extra_special_tokens: Sequence[str] = (),
                    overwrite: bool = False, progress: bool = True) -> TokenizerTrainingSummary:
    """Trains a byte-level BPE on the documents of ``inputs`` and writes it to ``output``.

    The inputs are what ``tools/preprocess_text.py`` takes, read the same way (the same
    ``field``, ``txt_document`` and malformed records counted up to ``max_skips``, then an
    error naming the record); ``max_documents`` stops reading after that many documents (a
    sample of a large corpus is enough for a tokenizer). ``output`` (a ``.json`` path) must not
    exist unless ``overwrite``; it is written atomically and then loaded with
    :func:`megatron_vlm.data.tokenizer.load_tokenizer`, as the data tools will load it.
    """
    from megatron_vlm.data.text_preprocess import (
        check_txt_document,
        expand_text_inputs,
        iter_documents,
    )
    from megatron_vlm.data.tokenizer import load_tokenizer
    from megatron_vlm.fsutil import write_text_atomic
    from megatron_vlm.progress import Progress

    output = os.fspath(output)
    # Everything that can be refused is refused before the corpus is read.
    if not output.lower().endswith(".json"):
        raise ValueError(f"{output}: the output must be a tokenizer file ending in .json "
                         f"(for example tokenizer.json)")
    if os.path.isdir(output):
        raise ValueError(f"{output} is a directory; give the path of the tokenizer.json to write")
    if os.path.exists(output) and not overwrite:
        raise ValueError(f"{output} exists; use another --output, or --overwrite to replace it")
    if max_skips < 0:
        raise ValueError(f"max_skips={max_skips} must be >= 0")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents={max_documents} must be at least 1")
    specials = _special_tokens(extra_special_tokens)
    _check_vocab_size(vocab_size, specials)
    check_txt_document(txt_document)
    files = expand_text_inputs(inputs)
    if os.path.realpath(output) in {os.path.realpath(f) for f in files}:
        raise ValueError(f"{output} is one of the inputs (a directory given as --input holds "
                         f"it); write the tokenizer outside the corpus")

    t0 = time.perf_counter()
    summary = TokenizerTrainingSummary(output=output, requested_vocab_size=vocab_size)
    bar = Progress(None, "train_tokenizer", "doc", enabled=progress)

    def texts():
        for _, text in iter_documents(files, field, txt_document, max_skips,
                                      summary.skipped_records):
            yield text
            summary.documents += 1
            bar.update(1)
            if summary.documents == max_documents:
                return

    try:
        tokenizer_json = train_bpe(texts(), vocab_size, extra_special_tokens)
    finally:
        bar.close()
    if summary.documents == 0:
        named = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        skipped = len(summary.skipped_records)
        raise ValueError(f"the inputs ({named}) hold no documents"
                         + (f" ({skipped} records skipped as malformed)" if skipped else "")
                         + ": nothing to train a tokenizer on")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_text_atomic(output, tokenizer_json)
    tokenizer = load_tokenizer(output)
    summary.vocab_size = tokenizer.vocab_size
    summary.special_tokens = {t: tokenizer.token_to_id(t) for t in specials}
    summary.seconds = time.perf_counter() - t0
    if summary.vocab_size < vocab_size:
        logger.warning("train_tokenizer: %s has %d tokens, fewer than the %d asked for (the "
                       "corpus has too few repeated pairs for more)", output,
                       summary.vocab_size, vocab_size)
    return summary
