"""Sample layouts and loss masks, checked token by token; collate and the attention mask."""

import re

import numpy as np
import pytest
import torch

from megatron_vlm.data.batch import attention_mask_from_segments, document_boundaries

from megatron_vlm.data.samples import (
    ConversationError,
    Sample,
    build_caption_sample,
    build_instruction_sample,
    build_text_sample,
    collate,
    resolve_separator,
    tokenize_conversation,
    tokenize_prompt,
)

PAD, EOS, SEP = 0, 2, 3


class FakeTokenizer:
    """Whitespace words -> fixed ids (new words get the next id from 10)."""

    def __init__(self):
        self.vocab = {"<eos>": EOS, "<sep>": SEP}
        self.eos_id = EOS

    def encode(self, text):
        return [self.vocab.setdefault(w, 10 + len(self.vocab) - 2) for w in text.split()]

    def token_to_id(self, token):
        return self.vocab.get(token)

    @property
    def vocab_size(self):
        return 10 + len(self.vocab)


def arr(values, dtype=np.int64):
    return np.array(values, dtype=dtype)


def check(sample: Sample, tokens, labels, loss, image, segments):
    np.testing.assert_array_equal(sample.tokens, arr(tokens))
    np.testing.assert_array_equal(sample.labels, arr(labels))
    np.testing.assert_array_equal(sample.loss_mask, arr(loss, np.float32))
    np.testing.assert_array_equal(sample.image_mask, arr(image, bool))
    np.testing.assert_array_equal(sample.segment_ids, arr(segments, np.int32))
    assert sample.tokens.dtype == np.int64 and sample.labels.dtype == np.int64
    assert sample.loss_mask.dtype == np.float32 and sample.image_mask.dtype == bool
    assert sample.segment_ids.dtype == np.int32


# ----------------------------------------------------------------------------- caption samples


def test_caption_sample_padded():
    s = build_caption_sample([10, 11, 12], n_img=3, separator_id=SEP, eos_id=EOS, seq_length=12,
                             pad_id=PAD, image_key="img/a.jpg")
    check(s,
          tokens=[0, 0, 0, 3, 10, 11, 12, 2, 0, 0, 0, 0],
          labels=[0, 0, 3, 10, 11, 12, 2, 0, 0, 0, 0, 0],
          # image positions (the last one predicting SEP included) carry no loss; the separator
          # predicts the first caption token with loss; EOS and padding carry none
          loss=[0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
          image=[1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
          segments=[0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1])
    assert s.has_image and s.source == "caption" and s.image_key == "img/a.jpg"
    assert s.positions_by_source == {"caption": 8}  # padding counts for no source
    assert s.truncated_tokens == 0 and not s.truncated and s.has_loss
    assert s.num_loss_tokens == 4 and s.num_image_positions == 3 and s.num_padding == 4


def test_caption_truncation_keeps_eos_and_counts():
    s = build_caption_sample(list(range(10, 20)), n_img=3, separator_id=SEP, eos_id=EOS,
                             seq_length=8, pad_id=PAD)
    check(s,
          tokens=[0, 0, 0, 3, 10, 11, 12, 2],
          labels=[0, 0, 3, 10, 11, 12, 2, 0],
          loss=[0, 0, 0, 1, 1, 1, 1, 0],
          image=[1, 1, 1, 0, 0, 0, 0, 0],
          segments=[0] * 8)
    assert s.truncated and s.truncated_tokens == 7


def test_caption_exact_fit_and_trailing_eos_not_doubled():
    s = build_caption_sample(np.array([10, 11, 2], np.int32), n_img=2, separator_id=SEP, eos_id=EOS,
                             seq_length=6, pad_id=PAD)
    np.testing.assert_array_equal(s.tokens, [0, 0, 3, 10, 11, 2])
    assert s.truncated_tokens == 0
    empty = build_caption_sample([], n_img=2, separator_id=SEP, eos_id=EOS, seq_length=5, pad_id=PAD)
    check(empty, tokens=[0, 0, 3, 2, 0], labels=[0, 3, 2, 0, 0], loss=[0, 0, 1, 0, 0],
          image=[1, 1, 0, 0, 0], segments=[0, 0, 0, 0, -1])


def test_caption_errors():
    with pytest.raises(ValueError, match="seq_length=4"):
        build_caption_sample([10], n_img=3, separator_id=SEP, eos_id=EOS, seq_length=4, pad_id=PAD)
    with pytest.raises(ValueError, match="fill='zeros'"):
        build_caption_sample([10], 1, SEP, EOS, 8, PAD, fill="zeros")
    with pytest.raises(RuntimeError, match="text_tokens_iter"):
        build_caption_sample([10], 1, SEP, EOS, 8, PAD, fill="text")


def test_caption_fill_text_packs_documents_in_segments():
    docs = iter([[20, 21, 2], [], [30, 2], [40, 41, 42, 43, 2], [50, 2]])
    s = build_caption_sample([10], n_img=2, separator_id=SEP, eos_id=EOS, seq_length=12,
                             pad_id=PAD, fill="text", text_tokens_iter=docs)
    check(s,
          tokens=[0, 0, 3, 10, 2, 20, 21, 2, 30, 2, 40, 41],
          # a whole document's last token (EOS) has no target in its segment; the cut document's
          # last position predicts its real next token (42)
          labels=[0, 3, 10, 2, 0, 21, 2, 0, 2, 0, 41, 42],
          loss=[0, 0, 1, 1, 0, 1, 1, 0, 1, 0, 1, 1],
          image=[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
          segments=[0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    assert s.positions_by_source == {"caption": 5, "text": 7}
    assert sum(s.positions_by_source.values()) == 12
    assert next(docs) == [50, 2]  # the iterator continues after the documents used


def test_caption_fill_text_exhausted_iterator_pads_and_custom_names():
    s = build_caption_sample([10, 11], n_img=1, separator_id=SEP, eos_id=EOS, seq_length=10,
                             pad_id=PAD, fill="text", text_tokens_iter=iter([[7, 8, 2]]),
                             source="datacomp", text_source="dclm")
    check(s,
          tokens=[0, 3, 10, 11, 2, 7, 8, 2, 0, 0],
          labels=[3, 10, 11, 2, 0, 8, 2, 0, 0, 0],
          loss=[0, 1, 1, 1, 0, 1, 1, 0, 0, 0],
          image=[1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
          segments=[0, 0, 0, 0, 0, 1, 1, 1, -1, -1])
    assert s.positions_by_source == {"datacomp": 5, "dclm": 3}
    full = build_caption_sample([10], 1, SEP, EOS, 4, PAD, fill="text", text_tokens_iter=iter([]))
    assert full.positions_by_source == {"caption": 4}


# ----------------------------------------------------------------------------- conversations

TURNS = [
    {"from": "human", "value": "<image>\nwhat color"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "why"},
    {"from": "gpt", "value": "paint it"},
]


def test_tokenize_conversation_layout_and_targets():
    tok = FakeTokenizer()
    tokens, mask, has_image = tokenize_conversation(TURNS, tok, SEP, "be brief")
    be, brief, what, color, red, why, paint, it = (tok.vocab[w] for w in
                                                   "be brief what color red why paint it".split())
    assert tokens == [be, brief, SEP, what, color, SEP, red, SEP, why, SEP, paint, it, SEP]
    # system prompt and its separator, questions and their separators: masked;
    # responses and the separator after each response: targets
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1]
    assert has_image
    tokens2, mask2, _ = tokenize_conversation(TURNS, tok, SEP, None)
    assert tokens2 == tokens[3:] and mask2 == mask[3:]
    # the evaluation prompt is laid out like the training prefix
    assert tokenize_prompt("<image>\nwhat color", tok, SEP, "be brief") == tokens[:6]


def test_image_placeholder_positions_and_text_only():
    tok = FakeTokenizer()
    for value in ("what color\n<image>", "<image>what color", "  <image>\nwhat color  "):
        t, _, img = tokenize_conversation([{"from": "human", "value": value},
                                           {"from": "gpt", "value": "red"}], tok, SEP)
        assert t == [tok.vocab["what"], tok.vocab["color"], SEP, tok.vocab["red"], SEP] and img
    t, m, img = tokenize_conversation([{"from": "human", "value": "hi"},
                                       {"from": "gpt", "value": "hello"}], tok, SEP)
    assert not img and m == [0, 0, 1, 1]
    _, _, img = tokenize_conversation([{"from": "human", "value": "hi"},
                                       {"from": "gpt", "value": "hello"}], tok, SEP, has_image=True)
    assert img  # a record with an image but no placeholder still gets its image first


@pytest.mark.parametrize("turns,match", [
    ([], "'conversations' must be a non-empty list"),
    ("hello", "'conversations' must be a non-empty list"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], r"turn 0, field 'from'"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], r"turn 1, field 'from'"),
    ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], r"turn 1, field 'from'.*'bot'"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}], r"turn 1, field 'value'"),
    ([{"from": "human", "value": "a"}, {"from": "gpt"}], r"turn 1, field 'value'"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
      {"from": "human", "value": "<image> c"}, {"from": "gpt", "value": "d"}],
     r"turn 2, field 'value'.*first turn only"),
    ([{"from": "human", "value": "<image> <image> a"}, {"from": "gpt", "value": "b"}],
     r"turn 0, field 'value'.*found 2"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
     r"turn 2, field 'from'.*ends with a 'human' turn"),
    (["not a dict", {"from": "gpt", "value": "b"}], r"turn 0: a turn must be an object"),
])
def test_malformed_conversations_name_record_turn_field(turns, match):
    with pytest.raises(ConversationError, match=r"^record 'rec-7'") as err:
        tokenize_conversation(turns, FakeTokenizer(), SEP, record_id="rec-7")
    assert err.value.record_id == "rec-7"
    assert re.search(match, str(err.value)), str(err.value)


def test_placeholder_in_record_without_image_is_an_error():
    turns = [{"from": "human", "value": "<image>\na"}, {"from": "gpt", "value": "b"}]
    with pytest.raises(ConversationError, match=r"record 'x1', turn 0, field 'value'.*without an image"):
        tokenize_conversation(turns, FakeTokenizer(), SEP, record_id="x1", has_image=False)


def test_resolve_separator():
    tok = FakeTokenizer()
    assert resolve_separator(tok, "<sep>") == SEP
    assert resolve_separator(tok, "word") == tok.vocab["word"]  # encodes to one token
    with pytest.raises(ValueError, match="not a single token.*2 tokens"):
        resolve_separator(tok, "two words")


# ----------------------------------------------------------------------------- instruction samples


def conversation():
    tok = FakeTokenizer()
    tokens, mask, _ = tokenize_conversation(TURNS, tok, SEP, "be brief")
    return tok, tokens, mask


def test_instruction_sample_with_image():
    tok, conv, mask = conversation()
    v = tok.vocab
    s = build_instruction_sample(conv, mask, n_img=2, seq_length=20, pad_id=PAD, eos_id=EOS,
                                 image_key="coco/1.jpg", key="rec-1")
    be, br, wh, co, red, why, pa, it = (v[w] for w in "be brief what color red why paint it".split())
    check(s,
          tokens=[0, 0, be, br, 3, wh, co, 3, red, 3, why, 3, pa, it, 3, 2, 0, 0, 0, 0],
          labels=[0, be, br, 3, wh, co, 3, red, 3, why, 3, pa, it, 3, 2, 0, 0, 0, 0, 0],
          # loss where the label is a response token, a response's separator or the final EOS
          loss=[0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
          image=[1, 1] + [0] * 18,
          segments=[0] * 16 + [-1] * 4)
    assert s.has_image and s.image_key == "coco/1.jpg" and s.source == "instruction"
    assert s.positions_by_source == {"instruction": 16} and not s.truncated


def test_instruction_sample_text_only():
    tok = FakeTokenizer()
    conv, mask, img = tokenize_conversation([{"from": "human", "value": "hi there"},
                                             {"from": "gpt", "value": "hello"}], tok, SEP)
    assert not img
    s = build_instruction_sample(conv, mask, 0, 8, PAD, EOS, source="llava")
    hi, there, hello = tok.vocab["hi"], tok.vocab["there"], tok.vocab["hello"]
    check(s,
          tokens=[hi, there, 3, hello, 3, 2, 0, 0],
          labels=[there, 3, hello, 3, 2, 0, 0, 0],
          loss=[0, 0, 1, 1, 1, 0, 0, 0],
          image=[0] * 8,
          segments=[0] * 6 + [-1, -1])
    assert not s.has_image and s.image_key is None and s.positions_by_source == {"llava": 6}


def test_instruction_truncation_and_no_loss_flag():
    tok, conv, mask = conversation()  # 13 tokens; with 2 image positions and EOS: 16
    s = build_instruction_sample(conv, mask, 2, 10, PAD, EOS)
    np.testing.assert_array_equal(s.tokens[:10], ([0, 0] + conv)[:10])
    np.testing.assert_array_equal(s.labels, ([0, 0] + conv)[1:11])
    np.testing.assert_array_equal(s.loss_mask, [0, 0, 0, 0, 0, 0, 0, 1, 1, 0])
    assert s.truncated_tokens == 6 and s.has_loss and 2 not in s.tokens.tolist()  # no EOS when cut
    # cut right after the first question's separator: its position still predicts "red"
    s = build_instruction_sample(conv, mask, 2, 8, PAD, EOS)
    np.testing.assert_array_equal(s.loss_mask, [0, 0, 0, 0, 0, 0, 0, 1])
    assert s.labels[7] == tok.vocab["red"] and s.has_loss
    # every response cut away: no loss tokens, flagged
    s = build_instruction_sample(conv, mask, 2, 7, PAD, EOS)
    assert not s.has_loss and s.num_loss_tokens == 0 and s.truncated_tokens == 9


def test_instruction_errors():
    with pytest.raises(RuntimeError, match="loss mask of 2"):
        build_instruction_sample([5, 6, 7], [0, 1], 0, 8, PAD, EOS)
    with pytest.raises(ValueError, match="seq_length=4"):
        build_instruction_sample([5], [1], 4, 4, PAD, EOS)


# ----------------------------------------------------------------------------- text samples


def test_text_sample_segments_from_eos():
    s = build_text_sample([5, 6, 2, 7, 8, 2, 9], eos_id=EOS)
    check(s,
          tokens=[5, 6, 2, 7, 8, 2],
          labels=[6, 2, 7, 8, 2, 9],
          loss=[1] * 6,
          image=[0] * 6,
          segments=[0, 0, 0, 1, 1, 1])
    assert s.positions_by_source == {"text": 6} and not s.has_image
    flat = build_text_sample([5, 6, 2, 7, 8, 2, 9], eos_id=EOS, document_attention=False)
    np.testing.assert_array_equal(flat.segment_ids, [0] * 6)
    np.testing.assert_array_equal(build_text_sample([2, 2, 5]).segment_ids, [0, 0])
    np.testing.assert_array_equal(build_text_sample([2, 2, 5], eos_id=2).segment_ids, [0, 1])
    with pytest.raises(ValueError, match="at least 2"):
        build_text_sample([1])


# ----------------------------------------------------------------------------- attention mask


def test_attention_mask_causal_block_diagonal_no_empty_rows():
    seg = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    mask = attention_mask_from_segments(seg)
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.bool
    allowed = ~mask[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 0],  # padding attends only to itself
        [0, 0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    assert torch.equal(~mask[1, 0], torch.ones(7, 7, dtype=torch.bool).tril())
    assert bool((~mask).any(-1).all())  # no fully masked row
    # a 1-D segment vector is one row
    assert attention_mask_from_segments(seg[0]).shape == (1, 1, 7, 7)


def test_attention_mask_random_segments_properties():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = int(torch.randint(2, 30, (1,), generator=g))
        seg = torch.randint(-1, 4, (3, s), generator=g)  # any order: the properties still hold
        mask = attention_mask_from_segments(seg)
        allowed = ~mask[:, 0]
        i, j = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
        assert not bool((allowed & (j > i)).any())                      # causal
        same = seg.unsqueeze(2) == seg.unsqueeze(1)
        assert not bool((allowed & ~same).any())                        # inside a segment
        assert bool(allowed.diagonal(dim1=1, dim2=2).all())             # nobody fully masked


# ----------------------------------------------------------------------------- collate


def mixed_samples(n_img=3, seq_length=16):
    tok, conv, mask = conversation()
    return [
        build_text_sample(list(range(20, 20 + seq_length + 1)), eos_id=EOS),
        build_caption_sample([10, 11], n_img, SEP, EOS, seq_length, PAD, image_key="b"),
        build_instruction_sample(conv[:6], mask[:6], 0, seq_length, PAD, EOS),
        build_instruction_sample(conv, mask, n_img, seq_length, PAD, EOS, image_key="a"),
    ]


def test_collate_shapes_dtypes_and_image_row_order():
    d_enc, n_img = 4, 3
    table = {"a": torch.full((n_img, d_enc), 1.0), "b": torch.full((n_img, d_enc), 2.0)}
    calls = []

    def embeddings_for(key):
        calls.append(key)
        return table[key].to(torch.bfloat16)

    samples = mixed_samples(n_img)
    batch = collate(samples, embeddings_for)
    assert calls == ["b", "a"]  # row order
    assert batch["tokens"].shape == (4, 16) and batch["tokens"].dtype == torch.int64
    assert batch["labels"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    assert batch["image_mask"].dtype == torch.bool and batch["segment_ids"].dtype == torch.int32
    assert batch["image_embeddings"].shape == (2, n_img, d_enc)
    assert batch["image_embeddings"].dtype == torch.bfloat16
    assert batch["image_embeddings"][0, 0, 0] == 2.0 and batch["image_embeddings"][1, 0, 0] == 1.0
    for row, s in enumerate(samples):
        assert torch.equal(batch["loss_mask"][row], torch.from_numpy(s.loss_mask))
        assert torch.equal(batch["segment_ids"][row], torch.from_numpy(s.segment_ids))
    assert batch["image_mask"].sum(1).tolist() == [0, 3, 0, 3]
    assert "cu_seqlens" not in batch and "attention_mask" not in batch
    with_documents = collate(samples, embeddings_for, documents=True)
    cu, longest = document_boundaries(with_documents["segment_ids"])
    assert torch.equal(with_documents["cu_seqlens"], cu) and with_documents["max_seqlen"] == longest
    # an embedding attached to the sample is used as is
    samples[1].image_embedding = torch.full((n_img, d_enc), 5.0)
    assert collate(samples, embeddings_for)["image_embeddings"][0, 0, 0] == 5.0


def test_collate_text_only_and_errors():
    samples = mixed_samples()
    text_only = collate([samples[0], samples[2]])
    assert "image_embeddings" not in text_only and text_only["tokens"].shape == (2, 16)
    with pytest.raises(RuntimeError, match="no embeddings_for"):
        collate(samples)
    with pytest.raises(ValueError, match=r"image 'b' has shape \(2, 4\); expected \[3, d_enc\]"):
        collate(samples, lambda key: torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="different lengths"):
        collate([samples[0], build_text_sample([1, 2, 3])])


# ----------------------------------------------------------------------------- real tokenizer


def write_word_tokenizer(path, words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "<|endoftext|>": 1, "<sep>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path))
    return vocab


def test_real_tokenizer_conversation(tmp_path):
    tokenizer_mod = pytest.importorskip("megatron_vlm.data.tokenizer")
    vocab = write_word_tokenizer(tmp_path / "tokenizer.json", "what color red why paint it".split())
    tok = tokenizer_mod.load_tokenizer(tmp_path / "tokenizer.json")
    sep = resolve_separator(tok, "<sep>")
    assert sep == 2
    tokens, mask, img = tokenize_conversation(TURNS, tok, sep)
    v = vocab
    assert tokens == [v["what"], v["color"], 2, v["red"], 2, v["why"], 2, v["paint"], v["it"], 2]
    assert mask == [0, 0, 0, 1, 1, 0, 0, 1, 1, 1] and img
    with pytest.raises(ValueError, match="not a single token"):
        resolve_separator(tok, "what color")


# ----------------------------------------------------------------------------- the model


def test_vlm_accepts_collated_batch_and_segments_isolate_attention(runtime):
    from megatron_vlm.config import load_config
    from megatron_vlm.model.build import build_model

    cfg = load_config("tiny")
    n_img, d_enc = cfg.model.encoder.num_image_tokens, cfg.model.encoder.embed_dim
    L, vocab = 64, cfg.model.decoder.vocab_size
    model = build_model(cfg)
    model.eval()
    tok, conv, mask = conversation()
    docs = iter([[100 + i for i in range(9)] + [EOS]] * 10)
    samples = [
        build_caption_sample([40, 41, 42], n_img, SEP, EOS, L, PAD, fill="text",
                             text_tokens_iter=docs, image_key="x"),
        build_instruction_sample(conv, mask, n_img, L, PAD, EOS, image_key="y"),
        build_instruction_sample(conv, mask, 0, L, PAD, EOS),
        build_text_sample([(7 * i) % 300 + 5 for i in range(L)] + [EOS], eos_id=EOS),
    ]
    g = torch.Generator().manual_seed(0)
    table = {k: torch.randn(n_img, d_enc, generator=g).to(torch.bfloat16) for k in ("x", "y")}
    batch = collate(samples, table.__getitem__, documents=True)
    assert int(batch["tokens"].max()) < vocab

    def run(b):
        with torch.no_grad():
            return model(tokens=b["tokens"], labels=b["labels"], segment_ids=b["segment_ids"],
                         cu_seqlens=b["cu_seqlens"], max_seqlen=b["max_seqlen"],
                         image_mask=b["image_mask"], image_embeddings=b["image_embeddings"])

    per_token = run(batch)
    assert per_token.shape == (4, L)
    loss = (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    assert torch.isfinite(per_token).all() and torch.isfinite(loss)
    # changing the caption segment (its tokens and its image) leaves the packed text segments alone
    changed = dict(batch)
    changed["tokens"] = batch["tokens"].clone()
    changed["tokens"][0, n_img + 1:n_img + 4] = torch.tensor([50, 51, 52])
    changed["image_embeddings"] = batch["image_embeddings"].clone()
    changed["image_embeddings"][0] = torch.randn(n_img, d_enc, generator=g).to(torch.bfloat16)
    other = run(changed)
    text_positions = batch["segment_ids"][0] > 0
    assert int(text_positions.sum()) == samples[0].positions_by_source["text"]
    torch.testing.assert_close(other[0][text_positions], per_token[0][text_positions],
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other[0][~text_positions], per_token[0][~text_positions])
    torch.testing.assert_close(other[1:], per_token[1:], atol=1e-5, rtol=1e-5)
