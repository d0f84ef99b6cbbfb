"""The evaluation prompts (vlm-evaluation / LLaVA-1.5 wording) and their tokens.

A prompt is one human turn, worded as in vlm-evaluation (REFERENCE.md section 4), with the
``<image>`` placeholder in front when the example has an image:

* VQAv2, GQA, TextVQA, POPE, ShapesWorld VQA/POPE:
  ``"<image>\\n{question}\\nAnswer the question using a single word or phrase."``
* VizWiz: ``"<image>\\n{question}\\nWhen the provided information is insufficient, respond with
  'Unanswerable'.\\nAnswer the question using a single word or phrase."``
* TextVQA with OCR (``textvqa_ocr``), as LLaVA-1.5's ``llava_textvqa_val_v051_ocr.jsonl``:
  ``"<image>\\n{Question}\\nReference OCR token: {t1}, {t2}, ...\\nAnswer the question using a
  single word or phrase."`` (the line is kept, empty, when there are no OCR tokens). TextVQA
  questions are lower case in the official file; LLaVA's file, which vlm-evaluation uses,
  capitalizes their first letter, and so do both TextVQA prompts here.
* Grounding (RefCOCO/+/g, OCID-Ref, ShapesWorld): ``"<image>\\nPlease provide the bounding box
  coordinate of the region this sentence describes: \\"{sentence}\\""``.

(vlm-evaluation's TextVQA index already holds the OCR line and the instruction in its question
text and its prompt function adds the instruction again; the prompt here has it once, as LLaVA's
own evaluation does.)

:func:`prompt_tokens` lays the prompt out exactly as the model was fine-tuned
(:func:`megatron_vlm.data.samples.tokenize_prompt`): ``[system][SEP][question][SEP]``, with the
placeholder removed; the generation engine puts the image positions in front.
"""

from __future__ import annotations

from typing import Optional

from megatron_vlm.data.samples import IMAGE_PLACEHOLDER, tokenize_prompt
from megatron_vlm.evaluation.records import Example
from megatron_vlm.evaluation.tasks import task_info

SHORT_ANSWER = "Answer the question using a single word or phrase."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
OCR_REFERENCE = "Reference OCR token: "
BOX_REQUEST = 'Please provide the bounding box coordinate of the region this sentence describes: "{}"'

# Spellings of the POPE answers whose probability is read at the first generated position.
YES_SPELLINGS = ("Yes", "yes", " Yes", " yes")
NO_SPELLINGS = ("No", "no", " No", " no")


def prompt_text(example: Example) -> str:
    """The one human turn that asks ``example``'s question (layouts in the module docstring)."""
    info = task_info(example.task)
    head = f"{IMAGE_PLACEHOLDER}\n" if example.image is not None else ""
    question = example.question.strip()
    if info.kind == "box":
        return head + BOX_REQUEST.format(question)
    lines = [question]
    if info.kind == "textvqa":
        lines = [question[:1].upper() + question[1:]]
        if example.task == "textvqa_ocr":
            tokens = example.extra.get("ocr_tokens")
            if tokens is None or not all(isinstance(t, str) for t in tokens):
                raise ValueError(f"example {example.example_id!r} of task {example.task}: "
                                 "field extra['ocr_tokens'] must be a list of strings")
            lines.append(OCR_REFERENCE + ", ".join(tokens))
    if example.task == "vizwiz":
        lines.append(UNANSWERABLE)
    lines.append(SHORT_ANSWER)
    return head + "\n".join(lines)


def prompt_tokens(example: Example, tokenizer, separator_id: int,
                  system_prompt: Optional[str] = None) -> list[int]:
    """The prompt's token ids as the model was fine-tuned: ``[system][SEP][question][SEP]`` (no
    image positions: the generation engine adds them in front)."""
    return tokenize_prompt(prompt_text(example), tokenizer, separator_id, system_prompt)


def yes_no_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(ids of "Yes", ids of "No"): every spelling in ``YES_SPELLINGS`` / ``NO_SPELLINGS`` that
    is one token of ``tokenizer`` (its 1-token encoding, or the vocabulary entry of that
    spelling), in spelling order without repeats. Each id must decode to the word (any case,
    surrounding spaces aside).

    A ValueError (POPE cannot then be scored by the Yes/No probabilities) when either list is
    empty, and also when only the spellings with a leading space are single tokens: a response
    is encoded on its own, without a leading space (``tokenize_conversation``), so the first
    token the model learned to give is that of "Yes"/"yes"; if that is only part of the word
    (e.g. "y" + "es"), the probability of " yes" says nothing about the model's answer."""
    yes, yes_unspaced = _single_token_ids(tokenizer, YES_SPELLINGS, "yes")
    no, no_unspaced = _single_token_ids(tokenizer, NO_SPELLINGS, "no")
    name = getattr(tokenizer, "path", tokenizer)
    for word, ids, unspaced, spellings in (("Yes", yes, yes_unspaced, YES_SPELLINGS),
                                           ("No", no, no_unspaced, NO_SPELLINGS)):
        if not ids:
            raise ValueError(f"tokenizer {name!r}: none of "
                             f"{', '.join(repr(s) for s in spellings)} is a single token, so POPE "
                             f"cannot be scored by the probability of {word!r}")
        if not unspaced:
            raise ValueError(f"tokenizer {name!r}: {word!r} and {word.lower()!r} are not single "
                             f"tokens (only spellings with a leading space are), and responses "
                             f"begin without a space, so POPE cannot be scored by the probability "
                             f"of {word!r}")
    return yes, no


def _single_token_ids(tokenizer, spellings: tuple[str, ...], word: str) -> tuple[list[int], bool]:
    """(ids, whether a spelling without a leading space is among them)."""
    ids: list[int] = []
    unspaced = False
    for spelling in spellings:
        candidates = []
        encoded = list(tokenizer.encode(spelling))
        if len(encoded) == 1:
            candidates.append(int(encoded[0]))
        vocab_id = tokenizer.token_to_id(spelling)
        if vocab_id is not None:
            candidates.append(int(vocab_id))
        for token_id in candidates:
            # A vocabulary entry spelled like the word but meaning something else (a special
            # token, a byte-level alias) would silently score the wrong token.
            if tokenizer.decode([token_id]).strip().lower() != word:
                continue
            unspaced = unspaced or not spelling.startswith(" ")
            if token_id not in ids:
                ids.append(token_id)
    return ids, unspaced
