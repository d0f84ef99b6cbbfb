"""A fake Hugging Face ``datasets`` cache holding a few rows of every data set the paper's nine
lm-eval 0.4.13 text tasks read, so that the ``paper`` text suite runs with no network.

How ``datasets`` 5.2 finds a hub data set offline (``HF_HUB_OFFLINE=1``; read from
``datasets/load.py``): ``dataset_module_factory`` refuses to touch the hub (not even its local
snapshot cache ``HF_HUB_CACHE/datasets--ORG--NAME``) and falls back to
``CachedDatasetModuleFactory``, which looks only in the *datasets* cache for a builder prepared
earlier::

    HF_DATASETS_CACHE/ORG___NAME/CONFIG/VERSION/HASH/dataset_info.json
                                                    /NAME-SPLIT.arrow      (one per split)

(``NAME`` snake-cased, ``CONFIG`` = the ``dataset_name`` lm-eval passes, ``default`` when it
passes none). The ``cache`` packaged builder then reads the split list from
``dataset_info.json`` and the rows from the Arrow IPC stream files, exactly as it reloads a data
set that was once downloaded on a machine with network. That is the layout written here, with
``datasets``' own ``ArrowWriter`` and ``DatasetInfo`` so the files are what ``datasets`` writes.
A data set missing from it makes ``load_dataset`` raise ``ConnectionError`` ("Couldn't reach
... on the Hub"); one config missing beside others of the same data set, ``ValueError``
("Couldn't find cache for ORG/NAME for config 'CONFIG'").

Rows follow each task's schema (its YAML under ``lm_eval/tasks`` and its ``utils.py``): the
features of the real data set and every split the task names (``training_split`` is read even
0-shot, to build lm-eval's few-shot sampler). Evaluated splits hold 3-5 rows with the gold
answer at varying positions, except where a test needs fewer than a limit of 3 to be scored:
AGIEval LSAT-RC has 2 rows (so the three LSAT sections count different numbers of questions, as
the real ones do), and two of BIG-bench's 4 rows have no multiple-choice targets, which
lm-eval's ``filter_multiple_choice`` drops. Two LSAT sections score the same whatever the model
(:data:`FIXED_SCORES`), so their mean is known.

:func:`write_fake_cache` writes the cache and returns the environment a subprocess needs
(set the variables only in a child process: ``datasets`` and ``huggingface_hub`` read them at
import). :func:`scored_rows` is how many rows lm-eval scores per task under a ``limit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

# Any version and hash work: the cache builder globs CONFIG/*/* and takes the newest.
CACHE_VERSION = "0.0.0"
CACHE_HASH = "0fa4ec0de5a4ec0de5a4ec0de5a4ec0de5a4ec0d"


@dataclass(frozen=True)
class FakeDataset:
    """One (dataset_path, dataset_name) an lm-eval task loads, with its rows per split."""

    task: str                            # the lm-eval task that reads it
    path: str                            # dataset_path in the task's YAML
    config: Optional[str]                # dataset_name in the task's YAML (None: "default")
    eval_split: str                      # test_split, else validation_split, of the YAML
    features: Callable[[], object]       # -> datasets.Features (built lazily)
    splits: dict[str, list[dict]]
    keep: Callable[[dict], bool] = lambda row: True  # the task's process_docs filter

    @property
    def config_name(self) -> str:
        return self.config or "default"

    def eval_rows(self) -> int:
        """Rows of the evaluated split that lm-eval keeps after its process_docs."""
        return sum(1 for row in self.splits[self.eval_split] if self.keep(row))


# ---------------------------------------------------------------------- rows per data set
# Every generator takes the row index and the split, so splits differ and gold answers move.


def _lsat_row(section: str):
    """AGIEval rows (``gold`` is a list: lm-eval's process_results_mcqa counts a pick in it as
    right). AR lists every choice as right and RC none, so those two sections score 1 and 0
    whatever the model (:data:`FIXED_SCORES`); LR has one right choice, as the real data."""
    letters = "ABCDE"

    def row(i: int, split: str) -> dict:
        names = ["Fred", "Gina", "Hal", "Ivy", "Jon"]
        seat = (i * 2 + 1) % 5
        gold = {"ar": list(range(5)), "lr": [seat], "rc": []}[section]
        choices = [f"({letters[k]}){names[(k + i) % 5]}" for k in range(5)]
        return {"query": f"Q: [{section} {split} {i}] Five people sit in a row; {names[i % 5]} "
                         f"sits first. Who is in seat {seat + 1}? Answer Choices: "
                         + " ".join(choices) + "\nA: Among A through E, the answer is",
                "choices": choices, "gold": gold}
    return row


def _arc_row(i: int, split: str) -> dict:
    a, b = 3 + i, 4 + 2 * i
    gold = (i + 1) % 4
    options = [a + b + k - gold for k in range(4)]  # the sum sits at position ``gold``
    labels = ["1", "2", "3", "4"] if i == 2 else ["A", "B", "C", "D"]  # ARC mixes both
    return {"id": f"Mercury_{split}_{i}", "question": f"Tom has {a} red blocks and {b} blue "
                                                       "blocks. How many blocks does he have?",
            "choices": {"text": [f"{n} blocks" for n in options], "label": labels},
            "answerKey": labels[gold]}


def _bigbench_row(i: int, split: str) -> dict:
    if split == "default" and i in (1, 3):  # free-form rows: dropped by filter_multiple_choice
        return {"idx": i, "inputs": f"Concept: sea shell {i}. Describe it:",
                "targets": ["a shell from the sea"], "multiple_choice_targets": [],
                "multiple_choice_scores": []}
    options = ["A shell found by the sea.", "A sea that is a shell.", "A shell that sells seas.",
               "A boat shaped like a shell."]
    gold = i % 4
    options[0], options[gold] = options[gold], options[0]
    return {"idx": i, "inputs": f"Concept: sea shell ({split} {i}). Question: Which of the "
                                "following sentences best characterizes sea shells?\n Answer:",
            "targets": [options[gold]], "multiple_choice_targets": options,
            "multiple_choice_scores": [int(k == gold) for k in range(4)]}


def _boolq_row(i: int, split: str) -> dict:
    return {"question": f"is the red circle left of the blue square in scene {i}",
            "passage": f"Scene {i} ({split}): the red circle is "
                       f"{'left' if i % 2 else 'right'} of the blue square.",
            "idx": i, "label": -1 if split == "test" else i % 2}


def _copa_row(i: int, split: str) -> dict:
    cause = i % 2 == 0
    right, wrong = ("The rope was cut.", "The rope was red.") if cause else \
        ("It fell to the floor.", "It turned blue.")
    label = (i // 2) % 2
    choices = (right, wrong) if label == 0 else (wrong, right)
    return {"premise": f"The lamp {i} dropped." if cause else f"The glass {i} slipped.",
            "choice1": choices[0], "choice2": choices[1],
            "question": "cause" if cause else "effect", "idx": i,
            "label": -1 if split == "test" else label}


def _hellaswag_row(i: int, split: str) -> dict:
    endings = ["puts the lid on the pot.", "[title] eats the stove.", "sings to the onion.",
               "walks to the moon."]
    gold = (i + 2) % 4
    endings[0], endings[gold] = endings[gold], endings[0]
    ctx_a, ctx_b = f"A man stirs soup number {i} in a pot.", "he"
    return {"ind": i, "activity_label": "Cooking", "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": f"{ctx_a} {ctx_b}", "endings": endings,
            "source_id": f"activitynet~v_{split}{i}", "split": split, "split_type": "indomain",
            "label": "" if split == "test" else str(gold)}


def _mathqa_row(i: int, split: str) -> dict:
    a, b = 6 + i, 7 + 3 * i
    letters = "abcde"
    gold = (3 * i + 1) % 5
    values = [a * b + 2 * (k - gold) for k in range(5)]
    options = " , ".join(f"{letters[k]} ) {values[k]}" for k in range(5))
    return {"Problem": f"a shop sells {a} boxes with {b} pens each ({split}). how many pens ?",
            "Rationale": f"\"{a} * {b} = {a * b}\"", "options": options,
            "correct": letters[gold], "annotated_formula": f"multiply({a}, {b})",
            "linear_formula": "multiply(n0,n1)|", "category": "general"}


def _piqa_row(i: int, split: str) -> dict:
    good, bad = "Pour the water slowly into the cup.", "Pour the cup into the water quickly."
    label = i % 2
    return {"goal": f"How do I fill cup {i} without spilling ({split})?",
            "sol1": bad if label else good, "sol2": good if label else bad, "label": label}


def _pubmedqa_row(i: int, split: str) -> dict:
    decision = ("yes", "no", "maybe")[i % 3]
    return {"QUESTION": f"Does drug X{i} lower blood pressure?",
            "CONTEXTS": [f"We gave drug X{i} to 40 adults ({split}).",
                         "Pressure was measured after eight weeks."],
            "LABELS": ["METHODS", "RESULTS"], "MESHES": ["Hypertension", "Adult"],
            "YEAR": str(2000 + i), "reasoning_required_pred": decision,
            "reasoning_free_pred": decision, "final_decision": decision,
            "LONG_ANSWER": f"Drug X{i}: the answer is {decision}."}


def _rows(make: Callable[[int, str], dict], sizes: dict[str, int]) -> dict[str, list[dict]]:
    return {split: [make(i, split) for i in range(n)] for split, n in sizes.items()}


# ---------------------------------------------------------------------- features (real schemas)


def _lsat_features():
    from datasets import Features, List, Value

    return Features({"query": Value("string"), "choices": List(Value("string")),
                     "gold": List(Value("int64"))})


def _arc_features():
    from datasets import Features, List, Value

    return Features({"id": Value("string"), "question": Value("string"),
                     "choices": {"text": List(Value("string")), "label": List(Value("string"))},
                     "answerKey": Value("string")})


def _bigbench_features():
    from datasets import Features, List, Value

    return Features({"idx": Value("int32"), "inputs": Value("string"),
                     "targets": List(Value("string")),
                     "multiple_choice_targets": List(Value("string")),
                     "multiple_choice_scores": List(Value("int32"))})


def _boolq_features():
    from datasets import ClassLabel, Features, Value

    return Features({"question": Value("string"), "passage": Value("string"),
                     "idx": Value("int32"), "label": ClassLabel(names=["False", "True"])})


def _copa_features():
    from datasets import ClassLabel, Features, Value

    return Features({"premise": Value("string"), "choice1": Value("string"),
                     "choice2": Value("string"), "question": Value("string"),
                     "idx": Value("int32"), "label": ClassLabel(names=["choice1", "choice2"])})


def _hellaswag_features():
    from datasets import Features, List, Value

    text = ("activity_label", "ctx_a", "ctx_b", "ctx")
    return Features({"ind": Value("int32"), **{k: Value("string") for k in text},
                     "endings": List(Value("string")), "source_id": Value("string"),
                     "split": Value("string"), "split_type": Value("string"),
                     "label": Value("string")})


def _mathqa_features():
    from datasets import Features, Value

    return Features({k: Value("string") for k in (
        "Problem", "Rationale", "options", "correct", "annotated_formula", "linear_formula",
        "category")})


def _piqa_features():
    from datasets import Features, Value

    return Features({"goal": Value("string"), "sol1": Value("string"),
                     "sol2": Value("string"), "label": Value("int64")})


def _pubmedqa_features():
    from datasets import Features, List, Value

    return Features({"QUESTION": Value("string"), "CONTEXTS": List(Value("string")),
                     "LABELS": List(Value("string")), "MESHES": List(Value("string")),
                     **{k: Value("string") for k in (
                         "YEAR", "reasoning_required_pred", "reasoning_free_pred",
                         "final_decision", "LONG_ANSWER")}})


# lm-eval task -> its score, fixed by the rows whatever the model (see _lsat_row).
FIXED_SCORES = {"agieval_lsat_ar": 1.0, "agieval_lsat_rc": 0.0}

SPLITS3 = {"train": 3, "validation": 4, "test": 4}  # evaluated split: 4 rows (limit 3 cuts)

FAKE_DATASETS: tuple[FakeDataset, ...] = (
    FakeDataset("agieval_lsat_ar", "hails/agieval-lsat-ar", None, "test", _lsat_features,
                _rows(_lsat_row("ar"), {"test": 4})),
    FakeDataset("agieval_lsat_lr", "hails/agieval-lsat-lr", None, "test", _lsat_features,
                _rows(_lsat_row("lr"), {"test": 5})),
    FakeDataset("agieval_lsat_rc", "hails/agieval-lsat-rc", None, "test", _lsat_features,
                _rows(_lsat_row("rc"), {"test": 2})),  # fewer than a limit of 3
    FakeDataset("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", _arc_features,
                _rows(_arc_row, SPLITS3)),
    FakeDataset("bigbench_conceptual_combinations_multiple_choice", "hails/bigbench",
                "conceptual_combinations_zero_shot", "default", _bigbench_features,
                _rows(_bigbench_row, {"default": 4, "train": 3, "validation": 3}),
                keep=lambda row: len(row["multiple_choice_targets"]) > 0),
    FakeDataset("boolq", "aps/super_glue", "boolq", "validation", _boolq_features,
                _rows(_boolq_row, SPLITS3)),
    FakeDataset("copa", "aps/super_glue", "copa", "validation", _copa_features,
                _rows(_copa_row, {"train": 3, "validation": 5, "test": 3})),
    FakeDataset("hellaswag", "Rowan/hellaswag", None, "validation", _hellaswag_features,
                _rows(_hellaswag_row, SPLITS3)),
    FakeDataset("mathqa", "regisss/math_qa", None, "test", _mathqa_features,
                _rows(_mathqa_row, SPLITS3)),
    FakeDataset("piqa", "baber/piqa", None, "validation", _piqa_features,
                _rows(_piqa_row, {"train": 3, "validation": 4})),
    FakeDataset("pubmedqa", "bigbio/pubmed_qa", "pubmed_qa_labeled_fold0_source", "test",
                _pubmedqa_features, _rows(_pubmedqa_row, SPLITS3)),
)


def fake_dataset(task: str) -> FakeDataset:
    """The fake data set an lm-eval task reads; KeyError naming the known tasks otherwise."""
    for dataset in FAKE_DATASETS:
        if dataset.task == task:
            return dataset
    raise KeyError(f"no fake data set for lm-eval task {task!r} (known: "
                   f"{', '.join(d.task for d in FAKE_DATASETS)})")


def scored_rows(task: str, limit: Optional[int]) -> int:
    """How many rows lm-eval scores for ``task`` from the fake cache under ``limit``."""
    rows = fake_dataset(task).eval_rows()
    return rows if limit is None else min(rows, limit)


# ---------------------------------------------------------------------- the cache on disk


def datasets_cache(root: str | Path) -> Path:
    """The ``HF_DATASETS_CACHE`` of a fake cache written at ``root``."""
    return Path(root) / "huggingface" / "datasets"


def dataset_cache_dir(root: str | Path, path: str) -> Path:
    """Where the fake cache at ``root`` keeps every config of hub data set ``path``
    (``ORG___NAME``, as ``datasets`` names it)."""
    from datasets.naming import camelcase_to_snakecase

    namespace, name = path.split("/")
    return datasets_cache(root) / f"{namespace}___{camelcase_to_snakecase(name)}"


def write_fake_cache(root: str | Path) -> dict[str, str]:
    """Writes every data set of :data:`FAKE_DATASETS` under ``root`` and returns the environment
    variables that point ``datasets`` / ``huggingface_hub`` at it, offline (``HF_HOME``,
    ``HF_HUB_CACHE`` (left empty: offline ``datasets`` never reads it), ``HF_DATASETS_CACHE``,
    ``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``)."""
    root = Path(root)
    for dataset in FAKE_DATASETS:
        _write_prepared_builder(root, dataset)
    home = root / "huggingface"
    (home / "hub").mkdir(parents=True, exist_ok=True)
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
            "HF_DATASETS_CACHE": str(datasets_cache(root)), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}


def _write_prepared_builder(root: Path, dataset: FakeDataset) -> None:
    """One config as ``datasets`` leaves it after ``download_and_prepare``: an Arrow stream
    file per split and dataset_info.json listing the splits."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.arrow_writer import ArrowWriter

    out = dataset_cache_dir(root, dataset.path) / dataset.config_name / CACHE_VERSION / CACHE_HASH
    out.mkdir(parents=True, exist_ok=False)
    name = out.parents[2].name.split("___")[1]
    features = dataset.features()
    splits = SplitDict(dataset_name=name)
    for split, rows in dataset.splits.items():
        with ArrowWriter(features=features, path=str(out / f"{name}-{split}.arrow")) as writer:
            for row in rows:
                writer.write(features.encode_example(row))
            count, size = writer.finalize()
        splits.add(SplitInfo(name=split, num_bytes=size, num_examples=count, dataset_name=name))
    DatasetInfo(features=features, splits=splits, builder_name="parquet", dataset_name=name,
                config_name=dataset.config_name, version=CACHE_VERSION).write_to_directory(out)
