"""Tasks for causal LMs under the MeZO / DPZero protocol, read from Hugging Face ``datasets``.

These are the OPT experiments of MeZO (Malladi et al. 2023, ``large_models/``) and DPZero
(Zhang et al. 2024, ``opt/``): prompts from MeZO's ``templates.py``, 1000 train / 500 dev /
1000 test examples drawn with the data seed (``dpzo.data.hf_data``), candidate scoring by the mean
log-probability of each candidate's tokens and greedy generation for the QA tasks
(``dpzo.models.candidates``).

Task names are ``mezo-<task>`` (lower case, usable in paths), so they never clash with the
LM-BFF names used for masked LMs (``SST-2``, ``RTE``):

============== ============================ ======================= ===========================
name           dataset (config)             candidates              trained as
============== ============================ ======================= ===========================
mezo-sst2      glue (sst2)                  terrible / great        classification
mezo-rte       super_glue (rte)             Yes / No                classification
mezo-cb        super_glue (cb)              Yes / No / Maybe        classification
mezo-boolq     boolq                        Yes / No                classification
mezo-wsc       super_glue (wsc.fixed)       No / Yes                classification
mezo-wic       super_glue (wic)             No / Yes                classification
mezo-multirc   super_glue (multirc)         No / Yes                classification
mezo-copa      super_glue (copa)            the two choices         teacher forcing on the gold
mezo-record    super_glue (record)          the passage's entities  teacher forcing on the gold
mezo-squad     squad                        (generation)            teacher forcing, F1 / EM
mezo-drop      drop                         (generation)            teacher forcing, F1 / EM
============== ============================ ======================= ===========================

"classification": the loss is the cross-entropy over the candidates' scores (MeZO's
``--train_as_classification``); "teacher forcing": the loss is the mean negative log-likelihood
of the gold continuation's tokens (MeZO's ``mezo.sh`` turns classification off for COPA,
ReCoRD, SQuAD and DROP).  Classification tasks are always *evaluated* by the argmax of the
candidates' scores.

A prompt is ``prompt(texts)`` and a candidate continues it: the scored string is
``prompt(texts) + continuation(texts, candidate)``.  Both strings are stripped of spaces at the
ends, as MeZO's ``encode_prompt`` does, and the candidate's tokens are the tokens the full
string has beyond the prompt's (their count is the difference of the two encodings' lengths).

Two facts from MeZO's code that differ from its paper's table: BoolQ uses the third template
(``"{passage} {Question?}\\n"``), and ReCoRD uses the GPT-3 style template (highlights as
``- `` bullets, the candidate is the whole query with ``@placeholder`` replaced).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dpzo.data.task import CANDIDATE_SCORER, CANDIDATES, GENERATION

Texts = Sequence[str]

#: MeZO task -> its name in the published tables (DPZero's OPT table; ``report.reference``)
MEZO_REFERENCE_NAMES = {"mezo-sst2": "SST-2", "mezo-boolq": "BoolQ", "mezo-squad": "SQuAD", "mezo-drop": "DROP"}


@dataclass(frozen=True)
class HFTask:
    """A task read from a Hugging Face dataset and prompted for a causal LM (MeZO templates)."""

    name: str
    dataset: str  # Hugging Face dataset id, as passed to ``datasets.load_dataset``
    config: str | None  # its configuration (subset), or None
    row_format: str  # how a row becomes an Example (``dpzo.data.hf_data``)
    fields: tuple[str, ...]  # dataset columns kept as ``Example.texts``, in this order
    prompt: Callable[[Texts], str]
    continuation: Callable[[Texts, str], str]
    candidates: tuple[str, ...] = ()  # fixed candidates in label order; () = per example
    generation: bool = False  # QA: greedy decoding, SQuAD F1 / exact match
    train_as_classification: bool = True
    dev_size: int = 500  # MeZO's num_dev (carved from the sampled training examples)
    max_length: int = 2048  # MeZO's max_length (also capped by the model's positions)
    train_split: str = "train"
    test_split: str = "validation"  # MeZO evaluates on the validation split
    demo: bool = False  # never a demo task (same attribute as tasks.TaskSpec)

    @property
    def metric(self) -> str:
        """``f1`` for a generation (QA) task, ``accuracy`` otherwise."""
        return "f1" if self.generation else "accuracy"

    @property
    def num_classes(self) -> int:
        """Number of fixed candidates (0 when the candidates come with each example)."""
        return len(self.candidates)

    @property
    def labels(self) -> tuple[str, ...]:
        """The fixed candidates in label order (``Example.label`` indexes them); () when given per example."""
        return self.candidates

    @property
    def hf_id(self) -> str:
        """The dataset as messages name it: ``dataset`` or ``dataset/config``."""
        return self.dataset if self.config is None else f"{self.dataset}/{self.config}"

    # ---- the Task protocol (dpzo.data.task) ----

    @property
    def kind(self) -> str:
        """:data:`~dpzo.data.task.GENERATION` for a QA task, else :data:`~dpzo.data.task.CANDIDATES`."""
        return GENERATION if self.generation else CANDIDATES

    @property
    def scorer(self) -> str:
        """The candidate scorer (``dpzo.models.candidates.CandidateScorer``; causal LMs only)."""
        return CANDIDATE_SCORER

    @property
    def label_words(self) -> Mapping[str, str]:
        """Empty: whole continuations are scored, never one label-word token."""
        return {}

    @property
    def reference_name(self) -> str:
        """The name DPZero's OPT table gives the task (``mezo-boolq`` -> ``BoolQ``), else its own."""
        return MEZO_REFERENCE_NAMES.get(self.name, self.name)

    def source_files(self, data_dir: str | Path) -> list[str]:
        """None: the examples are read from the Hugging Face datasets cache (``hf_datasets.cache_dir``)."""
        return []

    def input_problems(self, data_dir: str | Path, hf_cache_dir: str | Path | None = None) -> list[str]:
        """The dataset missing from the datasets cache, with the command that fetches it."""
        from dpzo.data.hf_data import cache_location, fetch_command, is_cached

        if is_cached(self, hf_cache_dir):
            return []
        where = cache_location(hf_cache_dir)
        return [
            f"task '{self.name}': Hugging Face dataset {self.hf_id!r} is not in the datasets cache {where}; on a machine "
            f"with internet run `HF_DATASETS_CACHE={where} {fetch_command(self)}` and make that folder available "
            "here (or point hf_datasets.cache_dir at it)"
        ]

    def source_hint(self, data_dir: str | Path) -> str | None:
        """None: each task's own problem already names its fetch command."""
        return None

    def method_problem(self, method: str) -> str | None:
        """See :func:`method_problem`."""
        return method_problem(self, method)

    def largest_training_set(self, *, k: int, hf_datasets: Mapping | None = None) -> int:
        """``hf_datasets.train`` (1000 unless set), whatever ``k``."""
        from dpzo.data.hf_data import DEFAULT_TRAIN

        return int((hf_datasets or {}).get("train", DEFAULT_TRAIN))

    def label_counts(self, data_dir: str | Path) -> dict[int, int] | None:
        """None: MeZO's splits are drawn without regard to the labels."""
        return None

    def make_splits(
        self,
        out_dir: str | Path,
        *,
        seed: int,
        k: int,
        data_dir: str | Path,
        max_test: int,
        hf_datasets: Mapping | None = None,
    ) -> dict[str, int]:
        """MeZO's sampling (``dpzo.data.hf_data.make_hf_splits``) with the sizes of ``hf_datasets``
        (``train``, ``dev``: None takes the task's) and ``max_test`` test examples; ``k`` is not used."""
        from dpzo.data.hf_data import make_hf_splits

        hf = hf_datasets or {}
        return make_hf_splits(
            self,
            Path(out_dir),
            seed=int(seed),
            num_train=int(hf["train"]),
            num_dev=hf.get("dev"),
            num_test=int(max_test),
            cache_dir=hf.get("cache_dir"),
        )


def render_prompt(task: HFTask, texts: Texts) -> str:
    """The prompt after which candidates are scored (or an answer is generated)."""
    return task.prompt(texts).strip(" ")


def render_full(task: HFTask, texts: Texts, candidate: str) -> str:
    """The prompt followed by one candidate (or a gold answer, for teacher forcing)."""
    return (task.prompt(texts) + task.continuation(texts, candidate)).strip(" ")


# --------------------------------------------------------------------------------------
# MeZO's templates (large_models/templates.py), one pair of functions per task
# --------------------------------------------------------------------------------------


def _after(separator: str) -> Callable[[Texts, str], str]:
    def continuation(texts: Texts, candidate: str) -> str:
        return separator + candidate

    return continuation


def _sst2(t: Texts) -> str:
    return f"{t[0].strip()} It was"


def _rte(t: Texts) -> str:
    premise, hypothesis = t
    return f'{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n'


def _cb(t: Texts) -> str:
    premise, hypothesis = t
    return f'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n'


def _boolq(t: Texts) -> str:
    passage, question = t
    if not question.endswith("?"):
        question = question + "?"
    question = question[0].upper() + question[1:]
    return f"{passage} {question}\n"


def _wsc(t: Texts) -> str:
    text, span1, span2 = t
    return f'{text}\nIn the previous sentence, does the pronoun "{span2.lower()}" refer to {span1}? Yes or No?\n'


def _wic(t: Texts) -> str:
    word, sentence1, sentence2 = t
    return f'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n{sentence1}\n{sentence2}\n'


def _multirc(t: Texts) -> str:
    paragraph, question, answer = t
    return f'{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? Yes or No?\n'


def _copa(t: Texts) -> str:
    premise, question = t
    premise = premise.rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    if question == "effect":
        return premise + " so "
    if question == "cause":
        return premise + " because "
    raise ValueError(f"COPA question must be 'cause' or 'effect', got {question!r}")


def _copa_choice(t: Texts, choice: str) -> str:
    # MeZO's "correct" capitalisation: the choice continues the sentence, so its first word is
    # lower-cased unless it is "I".
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


def _record_passage(passage: str) -> str:
    return passage.replace("@highlight\n", "- ")


def _record(t: Texts) -> str:
    passage, _query = t
    return f"{_record_passage(passage)}\n-"


def _record_query(t: Texts, entity: str) -> str:
    _passage, query = t
    return " " + query.replace("@placeholder", entity)


def _squad(t: Texts) -> str:
    title, context, question = t
    return f"Title: {title}\nContext: {context}\nQuestion: {question.strip()}\nAnswer:"


def _drop(t: Texts) -> str:
    passage, question = t
    return f"Passage: {passage}\nQuestion: {question.strip()}\nAnswer:"


def _answer_line(t: Texts, answer: str) -> str:
    return f" {answer}\n"


_YES_NO = ("Yes", "No")
_NO_YES = ("No", "Yes")

MEZO_TASKS: dict[str, HFTask] = {
    task.name: task
    for task in (
        HFTask("mezo-sst2", "glue", "sst2", "label", ("sentence",), _sst2, _after(" "), ("terrible", "great")),
        HFTask("mezo-rte", "super_glue", "rte", "label", ("premise", "hypothesis"), _rte, _after(""), _YES_NO),
        # CB (250 training examples) and COPA (400): MeZO's mezo.sh keeps only 100 for dev.
        HFTask(
            "mezo-cb",
            "super_glue",
            "cb",
            "label",
            ("premise", "hypothesis"),
            _cb,
            _after(""),
            ("Yes", "No", "Maybe"),
            dev_size=100,
        ),
        HFTask("mezo-boolq", "boolq", None, "boolq", ("passage", "question"), _boolq, _after(""), _YES_NO),
        # WSC has 554 training examples; MeZO's script leaves dev at 500 (54 left to train on).
        # Dev is never used for selection here, so it gets 100 like CB and COPA.
        HFTask(
            "mezo-wsc",
            "super_glue",
            "wsc.fixed",
            "label",
            ("text", "span1_text", "span2_text"),
            _wsc,
            _after(""),
            _NO_YES,
            dev_size=100,
        ),
        HFTask("mezo-wic", "super_glue", "wic", "label", ("word", "sentence1", "sentence2"), _wic, _after(""), _NO_YES),
        HFTask(
            "mezo-multirc",
            "super_glue",
            "multirc",
            "label",
            ("paragraph", "question", "answer"),
            _multirc,
            _after(""),
            _NO_YES,
        ),
        HFTask(
            "mezo-copa",
            "super_glue",
            "copa",
            "copa",
            ("premise", "question"),
            _copa,
            _copa_choice,
            train_as_classification=False,
            dev_size=100,
        ),
        HFTask(
            "mezo-record",
            "super_glue",
            "record",
            "record",
            ("passage", "query"),
            _record,
            _record_query,
            train_as_classification=False,
        ),
        HFTask(
            "mezo-squad",
            "squad",
            None,
            "squad",
            ("title", "context", "question"),
            _squad,
            _answer_line,
            generation=True,
            train_as_classification=False,
        ),
        HFTask(
            "mezo-drop",
            "drop",
            None,
            "drop",
            ("passage", "question"),
            _drop,
            _answer_line,
            generation=True,
            train_as_classification=False,
        ),
    )
}


def method_problem(task: HFTask, method: str) -> str | None:
    """Why ``method`` cannot run on ``task`` (None when it can): checked before any job starts."""
    from dpzo.methods import TRAINER_NONE, TRAINER_ZO, ZO, find_method

    found = find_method(method)
    if found is None or found.trainer not in (TRAINER_NONE, TRAINER_ZO):  # evaluated, or trained by train_zo
        return (
            f"method {method!r} is not implemented for the MeZO task {task.name}; use zero-shot or a "
            f"zeroth-order method ({', '.join(ZO)})"
        )
    if found.masked and not task.candidates:
        return (
            f"method {method!r} needs fixed label words for its data-free mask; task {task.name} has "
            f"per-example candidates or answers (use it on mezo-sst2, mezo-rte, mezo-cb, mezo-boolq, "
            f"mezo-wsc, mezo-wic or mezo-multirc)"
        )
    return None
