"""Answer normalisation of the official VQA evaluation, and TextVQA's EvalAI answer processor.

The VQA rule (the official VQA evaluation code, as TRI's vlm-evaluation applies it in
``vlm_eval/util/evaluation/vqav2/eval.py``) has two steps:

1. :func:`process_punctuation`. Each mark of :data:`PUNCTUATION` is deleted outright when the
   input has it next to a space (``"red, blue"``) or when the input has a comma between two
   digits anywhere (``"1,000"``); otherwise it becomes a space (``"red,blue"`` -> ``"red blue"``,
   ``"yes!"`` -> ``"yes "``). Both tests look at the input text, not at the partly processed
   one. Then a period not followed by a digit is deleted, so decimal points survive
   (``"3.5"``) while a full stop goes (``"dogs."``). The official code passes ``re.UNICODE``
   where ``re.sub`` takes its ``count``, which caps this at 32 periods per answer; kept here.
2. :func:`process_digit_article`: lowercase, split on whitespace, number words ``none``/``zero``
   to ``ten`` become digits, the articles ``a``/``an``/``the`` are dropped, and contractions
   written without their apostrophe are repaired from :data:`CONTRACTIONS` (``dont`` ->
   ``don't``); words are joined with single spaces.

:func:`normalize_vqa_answer` is the whole pipeline (newlines and tabs to spaces and a strip
first), which vlm-evaluation applies to every prediction; :func:`strip_answer_punctuation` is the
punctuation step alone, which it applies to the ground-truth answers.

:class:`EvalAIAnswerProcessor` is the TextVQA processor (EvalAI / MMF ``EvalAIAnswerProcessor``):
lowercase, delete ``,`` and ``?``, split a possessive ``'s`` off its word (``"man's"`` ->
``"man 's"``), strip, then the same two steps. TextVQA's evaluator applies it to the prediction
and to every ground-truth answer.

The tables below are written from the official definitions, quirks included (the official
table maps ``somebody'd`` to ``somebodyd``; its capitalised keys such as ``Im`` can never match,
since lookups happen after lowercasing).
"""

from __future__ import annotations

import re
from functools import lru_cache

PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_",
                                "-", ">", "<", "@", "`", ",", "?", "!")
"""The marks the punctuation step removes (the period has its own rule; ``'`` and ``:`` stay)."""

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
"""Number words the official code turns into digits (only whole words, only up to ten)."""

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# "written form -> repaired form" pairs, one pair per entry, as in the official table.
_CONTRACTION_PAIRS = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't
couldn'tve couldn't've | couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't
hadnt hadn't | hadnt've hadn't've | hadn'tve hadn't've | hasnt hasn't | havent haven't
hed he'd | hed've he'd've | he'dve he'd've | hes he's | howd how'd | howll how'll | hows how's
Id've I'd've | I'dve I'd've | Im I'm | Ive I've | isnt isn't | itd it'd | itd've it'd've
it'dve it'd've | itll it'll | let's let's | maam ma'am | mightnt mightn't
mightnt've mightn't've | mightn'tve mightn't've | mightve might've | mustnt mustn't
mustve must've | neednt needn't | notve not've | oclock o'clock | oughtnt oughtn't
ow's'at 'ow's'at | 'ows'at 'ow's'at | 'ow'sat 'ow's'at | shant shan't | shed've she'd've
she'dve she'd've | she's she's | shouldve should've | shouldnt shouldn't
shouldnt've shouldn't've | shouldn'tve shouldn't've | somebody'd somebodyd
somebodyd've somebody'd've | somebody'dve somebody'd've | somebodyll somebody'll
somebodys somebody's | someoned someone'd | someoned've someone'd've
someone'dve someone'd've | someonell someone'll | someones someone's
somethingd something'd | somethingd've something'd've | something'dve something'd've
somethingll something'll | thats that's | thered there'd | thered've there'd've
there'dve there'd've | therere there're | theres there's | theyd they'd | theyd've they'd've
they'dve they'd've | theyll they'll | theyre they're | theyve they've | twas 'twas
wasnt wasn't | wed've we'd've | we'dve we'd've | weve we've | werent weren't | whatll what'll
whatre what're | whats what's | whatve what've | whens when's | whered where'd
wheres where's | whereve where've | whod who'd | whod've who'd've | who'dve who'd've
wholl who'll | whos who's | whove who've | whyll why'll | whyre why're | whys why's
wont won't | wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've
wouldn'tve wouldn't've | yall y'all | yall'll y'all'll | y'allll y'all'll
yall'd've y'all'd've | y'alld've y'all'd've | y'all'dve y'all'd've | youd you'd
youd've you'd've | you'dve you'd've | youll you'll | youre you're | youve you've
"""
CONTRACTIONS: dict[str, str] = dict(
    pair.split() for pair in _CONTRACTION_PAIRS.replace("\n", " | ").split("|") if pair.strip())
"""Contractions written without (or with a misplaced) apostrophe -> their repaired form."""

# The official pattern is r"(?!<=\d)(\.)(?!\d)": its first group was meant as a look-behind but
# is a look-ahead for the text "<=d", which never follows where a period is about to match, so
# the rule in force is "a period not followed by a digit".
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # 32: the official call passes re.UNICODE as `count`
_VQA_DIGIT_COMMA = re.compile(r"\d,\d")          # the official VQA code's comma test
_EVALAI_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")  # EvalAI's (also matches "1,,000")


def process_punctuation(text: str, _digit_comma: re.Pattern = _VQA_DIGIT_COMMA) -> str:
    """The official punctuation step (see the module docstring); no lowercasing, no strip."""
    delete_all = _digit_comma.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The official test reads the unprocessed input for every mark.
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """Lowercase; number words to digits; articles dropped; contractions repaired."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


@lru_cache(maxsize=1 << 16)
def normalize_vqa_answer(text: str) -> str:
    """The full official normalisation, as vlm-evaluation applies it to a VQA prediction."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


@lru_cache(maxsize=1 << 16)
def strip_answer_punctuation(text: str) -> str:
    """The punctuation step alone, as vlm-evaluation applies it to ground-truth VQA answers
    (no lowercasing, no number words, no strip: ``"yes!"`` becomes ``"yes "``)."""
    return process_punctuation(text)


class EvalAIAnswerProcessor:
    """TextVQA's answer processor (EvalAI's): callable on one answer string."""

    def __call__(self, answer: str) -> str:
        return _evalai_process(answer)


@lru_cache(maxsize=1 << 16)
def _evalai_process(answer: str) -> str:
    # EvalAI's word_tokenize step comes first: it deletes every comma, so EvalAI's digit-comma
    # test can only matter for text that reaches process_punctuation some other way.
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text, _EVALAI_DIGIT_COMMA))
