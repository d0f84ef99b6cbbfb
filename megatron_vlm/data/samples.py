"""Sample builders: the token layout and loss masks of every sequence the model trains on.

Every builder returns a :class:`Sample` of exactly ``seq_length`` positions. Position ``i``
holds input ``tokens[i]`` and is trained (where ``loss_mask[i] == 1``) to predict
``labels[i]``, the token that follows it. Positions that carry no loss still get a valid
vocabulary id as label (the next token of the same segment, else ``pad_id``) so the
cross-entropy never sees an out-of-range index. Image positions hold ``pad_id`` as a placeholder
token id; the model replaces their embeddings with the projected image patches.

``segment_ids`` number the documents of a sequence from 0; padding is -1. Attention stays inside
a segment (:func:`megatron_vlm.data.batch.attention_mask_from_segments`); padding positions
attend only to themselves.

Caption sample (``build_caption_sample``)::

    [image x n_img][SEP][caption tokens][EOS][fill ...]

* No image position carries loss, including the last one, whose next token is the separator.
* The separator carries loss: it predicts the first caption token (the caption is the target).
  Every caption token carries loss, the last one predicting EOS. The EOS position carries none
  (nothing of its segment follows it).
* A caption longer than the room ``seq_length - n_img - 2`` is cut to the room; EOS is always
  kept. ``Sample.truncated_tokens`` counts what was cut. A trailing EOS already present in
  ``caption_tokens`` is not doubled.
* The rest of the sequence (``fill``):

  - ``"pad"``: ``pad_id``, no loss, segment -1. Padding counts for no source in
    ``positions_by_source`` (as in the blend index, docs/blend.md).
  - ``"text"``: whole documents drawn from ``text_tokens_iter`` one after another, each its own
    segment (1, 2, ...), loss on every position whose next token is in the same document. A
    document that does not fit is cut at the end of the sequence; its last position then
    predicts the document's next (unseen) token with loss, as in a packed text window; its tail
    is dropped. An exhausted iterator leaves padding. Fill positions count toward
    ``text_source`` in ``positions_by_source``; the caption part (image, separator, caption,
    EOS) counts toward the caption source, padding toward none.

Instruction sample (``build_instruction_sample``)::

    [image x n_img (if any)][conversation tokens][EOS][pad ...]

Conversation tokens come from :func:`tokenize_conversation` (layout below) with a *target*
mask: ``conversation_loss_mask[j] == 1`` means token ``j`` is one the model is trained to
produce, so position ``j - 1`` carries the loss. The EOS appended after a whole conversation is
a target too (the last response's separator predicts it: the end of the document, as in
caption and text samples). Image positions never carry loss, so a conversation's first token
is never a target. A sequence longer than ``seq_length`` is cut there without EOS
(``truncated_tokens`` counts the cut; the last kept position still predicts the conversation's
real next token, with loss if that token is a target); if every response was cut away the
sample has no loss tokens and ``Sample.has_loss`` is False, so the loader can skip it with a
count.

Conversation layout (``tokenize_conversation``), kept plain and deterministic::

    [system prompt][SEP] ([question][SEP][response][SEP]) x turns

* Each turn's value is encoded on its own with the tokenizer (no BOS/EOS). No role prefixes:
  the separator alternates questions and responses, so a prompt at evaluation is
  ``[image][system][SEP][question][SEP]`` and generation stops at the next separator
  (:func:`tokenize_prompt` builds exactly that).
* Targets (loss): every response token and the separator after every response. Masked: the
  optional system prompt and its separator, every question and the separator after it.
* ``<image>`` is removed from the text together with one newline next to it; then each value is
  stripped of surrounding whitespace. At most one ``<image>``, only in the first (human) turn;
  a record declared to have no image must not contain one. A record with an image but no
  placeholder still gets its image first.
* Roles are ``human`` and ``gpt``, alternating, starting with ``human`` and ending with ``gpt``;
  values are non-empty strings. Violations raise :class:`ConversationError` naming the record,
  the turn index and the field.

Text sample (``build_text_sample``): a packed window of ``L + 1`` tokens gives
``tokens = window[:-1]`` and ``labels = window[1:]``, loss on every position (a position
holding EOS predicts the next document's first token, as in GPT pre-training). With ``eos_id``
and ``document_attention=True`` (the default) the segments follow the EOS tokens (an EOS
belongs to the document it ends), so attention stays inside each document; with
``document_attention=False`` the whole window is one segment (plain causal attention).

The LLaVA-1.5 JSON is turned into instruction shards by
:func:`megatron_vlm.data.llava_preprocess.preprocess_llava`, which tokenizes each record with
:func:`tokenize_llava_record`; this module imports no shard format, PIL or DALI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is imported where batches are built, so tokenizing workers start fast
    import torch

IMAGE_PLACEHOLDER = "<image>"
HUMAN, GPT = "human", "gpt"
FILL_MODES = ("pad", "text")


@dataclass(eq=False)  # arrays inside: compare fields explicitly
class Sample:
    """One training sequence of ``L`` positions (see the module docstring for the layouts)."""

    tokens: np.ndarray
    """int64 [L] input token ids (``pad_id`` at image and padding positions)."""
    labels: np.ndarray
    """int64 [L] next-token targets (valid ids everywhere; only ``loss_mask`` positions count)."""
    loss_mask: np.ndarray
    """float32 [L] 1 where the position carries loss."""
    image_mask: np.ndarray
    """bool [L] positions whose input is an image patch."""
    segment_ids: np.ndarray
    """int32 [L] document id per position from 0, -1 on padding."""
    has_image: bool
    """whether the sample starts with an image."""
    source: str
    """name of the source the sample was drawn from."""
    image_key: Optional[str] = None
    """key of the image's record in its image directory (embeddings: ``collate`` can look it
    up; encoded images: the loader decodes it for an online encoder)."""
    image_embedding: Optional[torch.Tensor] = None
    """the image embedding [n_img, d_enc], when already loaded (``collate`` uses it as is)."""
    key: Optional[str] = None
    """the record key, for messages."""
    positions_by_source: dict = field(default_factory=dict)
    """sequence positions filled by each source; padding counts for none."""
    truncated_tokens: int = 0
    """tokens of the sample's own content cut off to fit the sequence."""

    @property
    def seq_length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def truncated(self) -> bool:
        return self.truncated_tokens > 0

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def has_loss(self) -> bool:
        """False for a sample with no loss token at all (skip it)."""
        return bool(self.loss_mask.any())

    @property
    def num_image_positions(self) -> int:
        return int(self.image_mask.sum())

    @property
    def num_padding(self) -> int:
        return int((self.segment_ids < 0).sum())


class ConversationError(ValueError):
    """A malformed conversation record; names the record, turn index and field."""

    def __init__(self, record_id, message: str, turn: Optional[int] = None,
                 field_name: Optional[str] = None):
        where = f"record {record_id!r}" if record_id is not None else "conversation"
        if turn is not None:
            where += f", turn {turn}"
        if field_name is not None:
            where += f", field {field_name!r}"
        super().__init__(f"{where}: {message}")
        self.record_id = record_id
        self.turn = turn
        self.field_name = field_name


def _as_ids(tokens) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64).reshape(-1)


def _check_seq_length(seq_length: int, minimum: int, what: str) -> None:
    if seq_length < minimum:
        raise ValueError(f"seq_length={seq_length} is too short for {what} (needs at least {minimum})")


def build_caption_sample(caption_tokens: Sequence[int], n_img: int, separator_id: int, eos_id: int,
                         seq_length: int, pad_id: int, fill: str = "pad",
                         text_tokens_iter: Optional[Iterable[Sequence[int]]] = None, *,
                         source: str = "caption", text_source: str = "text",
                         image_key: Optional[str] = None, key: Optional[str] = None,
                         image_embedding: Optional[torch.Tensor] = None) -> Sample:
    """``[image][SEP][caption][EOS][fill]``; see the module docstring for masks and fill.

    ``text_tokens_iter`` (for ``fill="text"``) yields documents (token id sequences, normally
    ending in EOS). Pass an iterator to continue where the previous sample stopped; a list is
    restarted on every call.
    """
    if fill not in FILL_MODES:
        raise ValueError(f"fill={fill!r} is not one of {FILL_MODES}")
    if n_img < 1:
        raise ValueError(f"n_img={n_img} must be positive for a caption sample")
    _check_seq_length(seq_length, n_img + 2, f"a caption sample with {n_img} image positions")
    caption = _as_ids(caption_tokens)
    if caption.size and caption[-1] == eos_id:
        caption = caption[:-1]
    room = seq_length - n_img - 2
    truncated = max(0, caption.size - room)
    caption = caption[:room]
    content = np.concatenate([np.full(n_img, pad_id, np.int64), [separator_id], caption, [eos_id]])
    n = content.size

    tokens = np.full(seq_length, pad_id, np.int64)
    segment_ids = np.full(seq_length, -1, np.int32)
    tokens[:n] = content
    segment_ids[:n] = 0
    labels = np.full(seq_length, pad_id, np.int64)
    loss_mask = np.zeros(seq_length, np.float32)
    labels[:n - 1] = content[1:]
    loss_mask[n_img:n - 1] = 1.0  # the separator and every caption token; not EOS, not images
    image_mask = np.zeros(seq_length, bool)
    image_mask[:n_img] = True

    text_positions = 0
    if fill == "text":
        if text_tokens_iter is None:
            raise RuntimeError('fill="text" needs text_tokens_iter')
        it: Iterator = iter(text_tokens_iter)
        pos, segment = n, 0
        while pos < seq_length:
            doc = next(it, None)
            if doc is None:
                break
            doc = _as_ids(doc)
            if doc.size == 0:
                continue
            segment += 1
            take = min(doc.size, seq_length - pos)
            tokens[pos:pos + take] = doc[:take]
            segment_ids[pos:pos + take] = segment
            labels[pos:pos + take - 1] = doc[1:take]
            loss_mask[pos:pos + take - 1] = 1.0
            if take < doc.size:  # cut document: its last position still has a real next token
                labels[pos + take - 1] = doc[take]
                loss_mask[pos + take - 1] = 1.0
            pos += take
        text_positions = pos - n

    positions = {source: n}
    if text_positions:
        positions[text_source] = positions.get(text_source, 0) + text_positions
    return Sample(tokens=tokens, labels=labels, loss_mask=loss_mask, image_mask=image_mask,
                  segment_ids=segment_ids, has_image=True, source=source, image_key=image_key,
                  image_embedding=image_embedding, key=key, positions_by_source=positions,
                  truncated_tokens=int(truncated))


def build_instruction_sample(conversation_tokens: Sequence[int], conversation_loss_mask: Sequence[int],
                             n_img: int, seq_length: int, pad_id: int, eos_id: int, *,
                             source: str = "instruction", image_key: Optional[str] = None,
                             key: Optional[str] = None,
                             image_embedding: Optional[torch.Tensor] = None) -> Sample:
    """``[image (n_img > 0)][conversation][EOS][pad]``; see the module docstring for masks."""
    conv = _as_ids(conversation_tokens)
    target = np.asarray(conversation_loss_mask, dtype=np.float32).reshape(-1)
    if conv.size != target.size:
        raise RuntimeError(f"conversation of {conv.size} tokens has a loss mask of {target.size} "
                           f"(key {key!r})")
    if n_img < 0:
        raise ValueError(f"n_img={n_img} must be >= 0")
    _check_seq_length(seq_length, n_img + 1, f"an instruction sample with {n_img} image positions")
    full = np.concatenate([np.full(n_img, pad_id, np.int64), conv, [eos_id]])
    full_target = np.concatenate([np.zeros(n_img, np.float32), target, [1.0]])
    full_target[:n_img + 1] = 0.0  # images are never targets, nor is the first token after them
    truncated = max(0, full.size - seq_length)
    n = full.size - truncated
    m = min(n, full.size - 1)  # positions whose next token belongs to the document
    tokens = np.full(seq_length, pad_id, np.int64)
    tokens[:n] = full[:n]
    segment_ids = np.full(seq_length, -1, np.int32)
    segment_ids[:n] = 0
    labels = np.full(seq_length, pad_id, np.int64)
    loss_mask = np.zeros(seq_length, np.float32)
    # A cut sequence's last position still predicts the conversation's real next token.
    labels[:m] = full[1:m + 1]
    loss_mask[:m] = full_target[1:m + 1]
    image_mask = np.zeros(seq_length, bool)
    image_mask[:n_img] = True
    return Sample(tokens=tokens, labels=labels, loss_mask=loss_mask, image_mask=image_mask,
                  segment_ids=segment_ids, has_image=n_img > 0, source=source,
                  image_key=image_key if n_img > 0 else None, image_embedding=image_embedding,
                  key=key, positions_by_source={source: n}, truncated_tokens=int(truncated))


def build_text_sample(window_tokens: Sequence[int], eos_id: Optional[int] = None, *,
                      document_attention: bool = True, source: str = "text",
                      key: Optional[str] = None) -> Sample:
    """A packed text window of ``L + 1`` tokens -> an ``L``-position sample, loss everywhere."""
    window = _as_ids(window_tokens)
    if window.size < 2:
        raise ValueError(f"a text window needs at least 2 tokens, got {window.size}")
    tokens, labels = window[:-1].copy(), window[1:].copy()
    length = tokens.size
    if eos_id is not None and document_attention:
        ends = (tokens == eos_id).astype(np.int32)
        segment_ids = (np.cumsum(ends) - ends).astype(np.int32)  # an EOS closes its own document
    else:
        segment_ids = np.zeros(length, np.int32)
    return Sample(tokens=tokens, labels=labels, loss_mask=np.ones(length, np.float32),
                  image_mask=np.zeros(length, bool), segment_ids=segment_ids, has_image=False,
                  source=source, key=key, positions_by_source={source: length})


# ---------------------------------------------------------------------------------------------
# Conversations


def _strip_placeholder(value: str) -> tuple[str, int]:
    """The value without ``<image>`` (and one newline next to each), and the placeholder count."""
    count = value.count(IMAGE_PLACEHOLDER)
    if count:
        for pattern in (IMAGE_PLACEHOLDER + "\n", "\n" + IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER):
            value = value.replace(pattern, "")
    return value.strip(), count


def tokenize_conversation(turns: list, tokenizer, separator_id: int,
                          system_prompt: Optional[str] = None, *, record_id=None,
                          has_image: Optional[bool] = None) -> tuple[list[int], list[int], bool]:
    """LLaVA-1.5 turns -> (tokens, target mask, has_image); layout in the module docstring.

    ``has_image``: None infers it from the ``<image>`` placeholder; True says the record has an
    image (the placeholder is then optional); False makes a placeholder an error.
    """
    if not isinstance(turns, list) or not turns:
        raise ConversationError(record_id, "'conversations' must be a non-empty list of turns",
                                field_name="conversations")
    tokens: list[int] = []
    targets: list[int] = []
    if system_prompt:
        system = tokenizer.encode(system_prompt)
        tokens += list(system) + [separator_id]
        targets += [0] * (len(system) + 1)
    placeholders = 0
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ConversationError(record_id, f"a turn must be an object, got {type(turn).__name__}",
                                    turn=i)
        role = turn.get("from")
        expected = HUMAN if i % 2 == 0 else GPT
        if role not in (HUMAN, GPT):
            raise ConversationError(record_id, f"role must be 'human' or 'gpt', got {role!r}",
                                    turn=i, field_name="from")
        if role != expected:
            raise ConversationError(record_id, f"expected {expected!r} (roles alternate starting "
                                    f"with 'human'), got {role!r}", turn=i, field_name="from")
        value = turn.get("value")
        if not isinstance(value, str) or not value.strip():
            raise ConversationError(record_id, f"value must be a non-empty string, got {value!r}",
                                    turn=i, field_name="value")
        text, count = _strip_placeholder(value)
        if count:
            if has_image is False:
                raise ConversationError(record_id, f"{IMAGE_PLACEHOLDER} in a record without an "
                                        "image", turn=i, field_name="value")
            if i != 0 or count > 1 or placeholders:
                raise ConversationError(record_id, f"{IMAGE_PLACEHOLDER} may appear once, in the first "
                                        f"turn only (found {count} here)", turn=i, field_name="value")
            placeholders += count
        ids = list(tokenizer.encode(text)) if text else []
        tokens += ids + [separator_id]
        targets += [1 if role == GPT else 0] * (len(ids) + 1)
    if len(turns) % 2:
        raise ConversationError(record_id, "the conversation ends with a 'human' turn (no response)",
                                turn=len(turns) - 1, field_name="from")
    image = bool(placeholders) if has_image is None else bool(has_image)
    return tokens, targets, image


def tokenize_llava_record(record, tokenizer, separator_id: int, system_prompt: Optional[str] = None,
                          index: Optional[int] = None) -> tuple[str, list[int], list[int], Optional[str]]:
    """One record of the LLaVA-1.5 JSON (``id``, optional ``image``, ``conversations``) ->
    ``(key, tokens, target mask, image_key)``; ``image_key`` is the record's image path as
    written (relative to the image folder) or None. Errors are :class:`ConversationError`s
    naming the record (by ``id``, else by its position ``#index``) and the field."""
    where = f"#{index}" if index is not None else None
    if not isinstance(record, dict):
        raise ConversationError(where, f"a record must be an object, got {type(record).__name__}",
                                field_name="record")
    rid = record.get("id")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        raise ConversationError(where, f"'id' must be a non-empty string, got {rid!r}", field_name="id")
    key = str(rid)
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise ConversationError(key, f"'image' must be a relative path, got {image!r}",
                                field_name="image")
    if "conversations" not in record:
        raise ConversationError(key, "missing", field_name="conversations")
    tokens, targets, _ = tokenize_conversation(record["conversations"], tokenizer, separator_id,
                                               system_prompt, record_id=key,
                                               has_image=image is not None)
    return key, tokens, targets, image


def tokenize_prompt(question: str, tokenizer, separator_id: int,
                    system_prompt: Optional[str] = None) -> list[int]:
    """The tokens of an evaluation prompt, laid out exactly as a training conversation:
    ``[system][SEP][question][SEP]``; the response is generated after it, up to a separator.
    (Put the image in front as in training.)"""
    text, _ = _strip_placeholder(question)
    tokens: list[int] = []
    if system_prompt:
        tokens += list(tokenizer.encode(system_prompt)) + [separator_id]
    return tokens + (list(tokenizer.encode(text)) if text else []) + [separator_id]


def resolve_separator(tokenizer, token: str) -> int:
    """The id of ``token``, which must be one token of ``tokenizer``, else a ValueError."""
    token_id = tokenizer.token_to_id(token)
    if token_id is not None:
        return int(token_id)
    ids = list(tokenizer.encode(token))
    if len(ids) == 1:
        return int(ids[0])
    raise ValueError(f"separator token {token!r} is not a single token of the tokenizer "
                     f"(it encodes to {len(ids)} tokens: {ids[:8]})")


# ---------------------------------------------------------------------------------------------
# Batches


def _stack_embeddings(embeddings: list) -> torch.Tensor:
    """torch.stack, but bfloat16 is stacked as its int16 bit patterns: torch's CPU copy
    kernel for bfloat16 is several times slower, and this is the loader's largest copy."""
    import torch

    if embeddings[0].dtype == torch.bfloat16:
        return torch.stack([e.view(torch.int16) for e in embeddings]).view(torch.bfloat16)
    return torch.stack(embeddings)


def _image_entries(samples: Sequence[Sample],
                   embeddings_for: Optional[Callable[[str], torch.Tensor]],
                   images: Optional[torch.Tensor]) -> dict:
    """The batch's image entry: ``images`` as given (checked), else the stacked embeddings."""
    import torch

    if images is not None:
        rows_with_image = sum(s.has_image for s in samples)
        if images.dim() != 4 or images.shape[0] != rows_with_image or images.shape[1] != 3:
            raise RuntimeError(f"images have shape {tuple(images.shape)}; expected "
                               f"[{rows_with_image}, 3, S, S] (one per sample with an image)")
        return {"images": images} if rows_with_image else {}
    embeddings = []
    for row, s in enumerate(samples):
        if not s.has_image:
            continue
        emb = s.image_embedding
        if emb is None:
            if s.image_key is None or embeddings_for is None:
                raise RuntimeError(f"row {row} (key {s.key!r}) has an image but no embedding and "
                                   f"{'no image_key' if s.image_key is None else 'no embeddings_for'}")
            emb = embeddings_for(s.image_key)
        emb = torch.as_tensor(emb)
        if emb.dim() != 2 or emb.shape[0] != s.num_image_positions:
            raise ValueError(f"row {row}: the embedding of image {s.image_key!r} has shape "
                             f"{tuple(emb.shape)}; expected [{s.num_image_positions}, d_enc]")
        if embeddings and emb.shape != embeddings[0].shape:
            raise ValueError(f"row {row}: the embedding of image {s.image_key!r} has shape "
                             f"{tuple(emb.shape)}, unlike {tuple(embeddings[0].shape)} before it")
        embeddings.append(emb)
    return {"image_embeddings": _stack_embeddings(embeddings)} if embeddings else {}


def collate(samples: Sequence[Sample], embeddings_for: Optional[Callable[[str], torch.Tensor]] = None,
            *, images: Optional[torch.Tensor] = None, documents: bool = False) -> dict:
    """Stack samples into a batch (docs/architecture.md) plus ``segment_ids`` [b, s] int32.

    ``image_embeddings`` [k, n_img, d_enc] holds one embedding per sample with an image, in row
    order: the sample's ``image_embedding`` if set, else ``embeddings_for(image_key)``. The key
    is absent when no row has an image. For an online encoder pass ``images`` instead, the
    decoded images [k, 3, S, S] of the samples with an image in row order: the batch then
    carries them as ``images`` and no embedding is looked up. ``documents=True`` asks for
    attention kept inside each segment: it adds ``cu_seqlens`` and ``max_seqlen`` (see
    :func:`megatron_vlm.data.batch.document_boundaries`); the model turns them into packed
    sequences or a dense mask on the device.
    """
    import torch

    if not samples:
        raise RuntimeError("collate needs at least one sample")
    lengths = {s.seq_length for s in samples}
    if len(lengths) != 1:
        raise RuntimeError(f"samples have different lengths {sorted(lengths)}")
    batch = {
        "tokens": torch.from_numpy(np.stack([s.tokens for s in samples]).astype(np.int64)),
        "labels": torch.from_numpy(np.stack([s.labels for s in samples]).astype(np.int64)),
        "loss_mask": torch.from_numpy(np.stack([s.loss_mask for s in samples]).astype(np.float32)),
        "image_mask": torch.from_numpy(np.stack([s.image_mask for s in samples]).astype(bool)),
        "segment_ids": torch.from_numpy(np.stack([s.segment_ids for s in samples]).astype(np.int32)),
    }
    batch.update(_image_entries(samples, embeddings_for, images))
    if documents:
        from megatron_vlm.data.batch import document_boundaries

        batch["cu_seqlens"], batch["max_seqlen"] = document_boundaries(batch["segment_ids"])
    return batch
