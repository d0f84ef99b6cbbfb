"""Evaluation prompts (megatron_vlm.evaluation.prompts): the exact vlm-evaluation wording, the
token layout of fine-tuning, and the Yes/No token ids POPE is scored with."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_vlm.data.samples import tokenize_conversation
from megatron_vlm.evaluation.prompts import prompt_text, prompt_tokens, yes_no_token_ids
from megatron_vlm.evaluation.records import Example

SHORT = "\nAnswer the question using a single word or phrase."


def example(task: str, question: str, image: str | None = "a.jpg", **extra) -> Example:
    return Example(task=task, split="val", example_id="1", question=question, image=image,
                   extra=extra)


@pytest.mark.parametrize("task", ["vqav2", "gqa", "textvqa", "pope", "shapesworld_vqa",
                                  "shapesworld_pope"])
def test_short_answer_prompt(task):
    assert prompt_text(example(task, "Is there a cat?")) == "<image>\nIs there a cat?" + SHORT


def test_vizwiz_asks_for_unanswerable_before_the_short_answer_instruction():
    assert prompt_text(example("vizwiz", "What is this?")) == (
        "<image>\nWhat is this?\nWhen the provided information is insufficient, respond with "
        "'Unanswerable'.\nAnswer the question using a single word or phrase.")


def test_textvqa_prompts_follow_llava_textvqa_file():
    # the first line of LLaVA-1.5's llava_textvqa_val_v051_ocr.jsonl, from the official record
    ocr = example("textvqa_ocr", "what is the brand of this camera?",
                  ocr_tokens=("DAKOTA", "DIGITAL", "Single-Use", "Camera", "Pire", "digitat"))
    assert prompt_text(ocr) == (
        "<image>\nWhat is the brand of this camera?\nReference OCR token: DAKOTA, DIGITAL, "
        "Single-Use, Camera, Pire, digitat\nAnswer the question using a single word or phrase.")
    # no OCR tokens: the line stays, empty (as in LLaVA's file)
    empty = example("textvqa_ocr", "whats the lowest number yard line that you can see?", ocr_tokens=())
    assert prompt_text(empty) == ("<image>\nWhats the lowest number yard line that you can see?\n"
                                  "Reference OCR token: " + SHORT)
    plain = example("textvqa", "what is the brand of this camera?", ocr_tokens=("DAKOTA",))
    assert prompt_text(plain) == "<image>\nWhat is the brand of this camera?" + SHORT
    with pytest.raises(ValueError, match=r"example '1' of task textvqa_ocr: field extra\['ocr_tokens'\]"):
        prompt_text(example("textvqa_ocr", "what?"))


@pytest.mark.parametrize("task", ["refcoco", "refcoco+", "refcocog", "ocid_ref", "shapesworld_ref"])
def test_grounding_prompt(task):
    assert prompt_text(example(task, "the red circle on the left")) == (
        '<image>\nPlease provide the bounding box coordinate of the region this sentence '
        'describes: "the red circle on the left"')


def test_text_only_example_has_no_placeholder_and_unknown_task_is_refused():
    assert prompt_text(example("vqav2", "Is it?", image=None)) == "Is it?" + SHORT
    with pytest.raises(ValueError, match="unknown vision task 'nope'"):
        prompt_text(example("nope", "x"))


# ---------------------------------------------------------------------------------------------
# Tokens: the fine-tuning layout


@pytest.fixture(scope="module")
def shapesworld(tmp_path_factory) -> Path:
    from evaluation_helpers import small_shapesworld

    return small_shapesworld(tmp_path_factory.mktemp("sw"), eval_images=2)


@pytest.fixture(scope="module")
def tokenizer(shapesworld):
    from megatron_vlm.data.tokenizer import load_tokenizer

    return load_tokenizer(shapesworld / "tokenizer/tokenizer.json")


@pytest.mark.parametrize("system_prompt", [None, "You are a helpful assistant."])
@pytest.mark.parametrize("ex", [
    example("shapesworld_vqa", "What color is the circle?"),
    example("vizwiz", "What is this?"),
    example("textvqa_ocr", "what does it say?", ocr_tokens=("STOP", "3")),
    example("shapesworld_ref", "the red circle"),
    example("vqav2", "How many?", image=None),
], ids=["vqa", "vizwiz", "ocr", "ref", "text_only"])
def test_prompt_tokens_equal_a_training_conversation_up_to_the_response(tokenizer, ex, system_prompt):
    sep = tokenizer.token_to_id("<|sep|>")
    turns = [{"from": "human", "value": prompt_text(ex)}, {"from": "gpt", "value": "blue"}]
    tokens, targets, has_image = tokenize_conversation(turns, tokenizer, sep, system_prompt)
    first_target = targets.index(1)
    prompt = prompt_tokens(ex, tokenizer, sep, system_prompt)
    assert prompt == tokens[:first_target]
    assert prompt[-1] == sep and has_image == (ex.image is not None)
    # the placeholder is not in the text the model reads
    assert "<image>" not in tokenizer.decode(prompt)


# ---------------------------------------------------------------------------------------------
# Yes / No token ids


class FakeTokenizer:
    """encode/token_to_id/decode from tables, to pin down each rule of yes_no_token_ids."""

    path = "fake"

    def __init__(self):
        self.pieces = {5: "Yes", 6: "yes", 7: " Yes", 8: "No", 9: " ", 10: "no", 12: "<yes-special>",
                       13: " n", 14: "o", 15: "n", 16: " No", 17: "w"}
        # "no" encodes to two pieces but is one vocabulary entry (as with a sentencepiece model
        # that prefers "n" + "o" in context): token_to_id finds it.
        self.encodings = {"Yes": [5], "yes": [6], " Yes": [7], " yes": [9, 6], "No": [8],
                          "no": [15, 14], " No": [16, 17], " no": [13, 14]}
        self.vocab = {"Yes": 5, " yes": 12, "no": 10}

    def encode(self, text):
        return list(self.encodings[text])

    def token_to_id(self, token):
        return self.vocab.get(token)

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_yes_no_ids_are_the_single_token_spellings():
    # " yes", " No" and " no" (2 tokens each) are left out, even where the first token is the word
    # (" No" encodes to " No" + "w"); "no" is found as a vocabulary entry; entry 12 is spelled
    # " yes" but decodes to something else, so it is refused.
    assert yes_no_token_ids(FakeTokenizer()) == ([5, 6, 7], [8, 10])


def test_yes_no_ids_refuse_a_tokenizer_where_only_the_spaced_spelling_is_one_token():
    # responses are encoded without a leading space: "yes" -> "y" + "es" is what the model
    # learned to give first, so the probability of " yes" would decide nothing
    fake = FakeTokenizer()
    fake.pieces.update({18: "y", 19: "es", 20: " yes", 21: "Y"})
    fake.encodings.update({"Yes": [21, 19], "yes": [18, 19], " Yes": [9, 21, 19], " yes": [20]})
    fake.vocab = {}
    with pytest.raises(ValueError, match="'Yes' and 'yes' are not single tokens .*responses begin "
                                         "without a space"):
        yes_no_token_ids(fake)


def test_yes_no_ids_refuse_a_tokenizer_without_a_single_token_yes():
    fake = FakeTokenizer()
    fake.encodings.update({"Yes": [9, 5], "yes": [9, 6], " Yes": [9, 7]})
    fake.vocab = {}
    with pytest.raises(ValueError, match="none of 'Yes', 'yes', ' Yes', ' yes' is a single token"):
        yes_no_token_ids(fake)


def test_yes_no_ids_of_real_tokenizers(tokenizer, shapesworld, tmp_path):
    """ShapesWorld's small BPE has no single-token "Yes" (POPE there must be scored from the text);
    the same tokenizer with "Yes" and "No" added finds them, each decoding to its word."""
    with pytest.raises(ValueError, match=r"tokenizer\.json'.*cannot be scored by the probability "
                                         r"of 'Yes'"):
        yes_no_token_ids(tokenizer)
    from tokenizers import Tokenizer

    from megatron_vlm.data.tokenizer import load_tokenizer

    raw = Tokenizer.from_file(str(shapesworld / "tokenizer/tokenizer.json"))
    raw.add_tokens(["Yes", "No"])
    raw.save(str(tmp_path / "tokenizer.json"))
    extended = load_tokenizer(tmp_path / "tokenizer.json")
    yes, no = yes_no_token_ids(extended)
    assert yes[0] == extended.token_to_id("Yes") and no[0] == extended.token_to_id("No")
    assert not set(yes) & set(no)
    assert {extended.decode([i]).strip().lower() for i in yes} == {"yes"}
    assert {extended.decode([i]).strip().lower() for i in no} == {"no"}
