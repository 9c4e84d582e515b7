"""Prompt-based classification tasks: on-disk layout, LM-BFF templates and label words.

A task is described once here and serves both model families:

* masked LMs (RoBERTa) use the LM-BFF template syntax (Gao et al. 2021) and read the label-word
  logits at ``<mask>``;
* causal LMs (OPT) use a prompt prefix after which each label word is scored as the next token
  (MeZO's SST-2 template is ``{sentence} It was`` + `` terrible`` / `` great``).

Template syntax (LM-BFF): parts are separated by ``*``; ``cls``/``sep+``/``mask`` are the special
tokens; ``sent_i`` is text column i, ``+sent_i`` prepends a space, ``sentl_i`` lower-cases the
first character, ``sent-_i`` drops the last character; any other part is literal text in which
``_`` stands for a space.  Each part is tokenized separately, as in LM-BFF, so label words and
literal text tokenize the same way in every example.

The demo tasks (``demo-sst2``, ``demo-trec``) are the SST-2 and TREC specifications read from the
generated demo data directory instead of the user's LM-BFF data directory.

``TASKS`` holds every task of the pipeline, these and the MeZO/DPZero tasks of
``dpzo.data.hf_tasks``; both classes implement the :class:`dpzo.data.task.Task` protocol, which is
all the rest of the pipeline asks of a task.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from dpzo.data.task import PROMPT, PROMPT_SCORER, Task

logger = logging.getLogger(__name__)

#: Where the LM-BFF data (every task of this module but the demo ones) is downloaded from.
LMBFF_URL = "https://nlp.cs.princeton.edu/projects/lm-bff/datasets.tar"
#: LM-BFF directory (lower case) -> the task's name in the published tables (``report.reference``)
REFERENCE_NAMES = {"sst-2": "SST-2", "sst-5": "SST-5", "snli": "SNLI", "mnli": "MNLI", "rte": "RTE", "trec": "TREC"}


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to read a task from disk and turn an example into a prompt."""

    name: str
    lmbff_dir: str  # directory under ``<data_dir>/original/``
    file_format: str  # "glue-tsv" (header, named columns) | "tsv-noheader" (numbered columns) | "csv" (no header: label, text...)
    train_file: str
    test_file: str
    text_columns: tuple[str, ...]  # glue-tsv: column names; tsv-noheader: column numbers; csv: columns 1..
    label_column: str  # glue-tsv: name; tsv-noheader: number; csv: column 0
    label_words: Mapping[str, str]  # label value (as written in the file) -> label word
    template: str  # LM-BFF template for masked LMs
    causal_template: str  # prompt prefix for causal LMs; the label word is the next token
    max_length: int = 128
    metric: str = "accuracy"  # "accuracy" | "mcc" (CoLA) | "f1" of the positive class (MRPC, QQP)
    first_sent_limit: int | None = None  # tokens kept of sentence 0 before the prompt is built
    other_sent_limit: int | None = None  # tokens kept of every other sentence
    unlabelled: tuple[str, ...] = ()  # label values that mark rows without a gold label (dropped)
    demo: bool = False

    @property
    def labels(self) -> tuple[str, ...]:
        """The label values (as written in the file) in label order: ``Example.label`` indexes them."""
        return tuple(self.label_words)

    @property
    def num_classes(self) -> int:
        """Number of labels K."""
        return len(self.label_words)

    @property
    def sent_limits(self) -> dict:
        """The LM-BFF sentence limits as keyword arguments of :func:`encode_prompt`."""
        return {"first_sent_limit": self.first_sent_limit, "other_sent_limit": self.other_sent_limit}

    # ---- the Task protocol (dpzo.data.task) ----

    @property
    def kind(self) -> str:
        """Always :data:`~dpzo.data.task.PROMPT`: one position scored over the label words."""
        return PROMPT

    @property
    def scorer(self) -> str:
        """The prompt classifier (``dpzo.models.classifier.PromptClassifier``), masked or causal LM."""
        return PROMPT_SCORER

    @property
    def reference_name(self) -> str:
        """Its LM-BFF directory as the published tables spell it (``trec`` -> ``TREC``); the demo
        tasks are their SST-2 and TREC specifications, so they name those."""
        return REFERENCE_NAMES.get(self.lmbff_dir.lower(), self.lmbff_dir)

    def source_files(self, data_dir: str | Path) -> list[str]:
        """The train and test files in the LM-BFF layout: ``<data_dir>/original/<lmbff_dir>/``."""
        folder = f"{data_dir}/original/{self.lmbff_dir}"
        return [f"{folder}/{self.train_file}", f"{folder}/{self.test_file}"]

    def input_problems(self, data_dir: str | Path, hf_cache_dir: str | Path | None = None) -> list[str]:
        """The train or test file missing under ``data_dir`` (none for a demo task: the pipeline
        writes those)."""
        from dpzo.data.splits import missing_files

        if self.demo:
            return []
        missing = missing_files(self, Path(data_dir))
        if not missing:
            return []
        hint = " (some copies name the folder GLUE-SST-2: rename it to SST-2)" if self.name == "SST-2" else ""
        return [f"task '{self.name}': {', '.join(map(str, missing))} not found{hint}"]

    def source_hint(self, data_dir: str | Path) -> str | None:
        """Where the LM-BFF data comes from and where ``data_dir`` must point."""
        return (
            f"LM-BFF tasks: download {LMBFF_URL}, extract it and set data_dir (now {data_dir}) to the folder "
            "that holds original/<TASK>/"
        )

    def method_problem(self, method: str) -> str | None:
        """None: every method runs on a prompt-classification task."""
        return None

    def largest_training_set(self, *, k: int, hf_datasets: Mapping | None = None) -> int:
        """k per class (LM-BFF; a class with fewer examples gives fewer)."""
        return int(k) * self.num_classes

    def label_counts(self, data_dir: str | Path) -> dict[int, int] | None:
        """Examples per label of the training file (None for a demo task or a missing file)."""
        from dpzo.data.splits import missing_files, read_split

        if self.demo or missing_files(self, Path(data_dir)):
            return None
        counts: dict[int, int] = {}
        for ex in read_split(self, Path(data_dir), "train"):
            counts[ex.label] = counts.get(ex.label, 0) + 1
        return counts

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
        """LM-BFF's k-shot sets (``dpzo.data.splits.make_k_shot``); ``hf_datasets`` is not used."""
        from dpzo.data.splits import make_k_shot

        return make_k_shot(self, Path(data_dir), Path(out_dir), k=int(k), seed=int(seed), max_test=int(max_test))


# LM-BFF templates (Gao et al. 2021; the same strings in DP-ZOSO, MeZO and DPZero scripts).
_SENTIMENT = "*cls**sent_0*_It_was*mask*.*sep+*"
_THIS_IS = "*cls**sent_0*_This_is*mask*.*sep+*"
_NLI = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"
_PARAPHRASE = "*cls**sent_0**mask*,*+sentl_1**sep+*"
_QUESTION_TYPE = "*cls**mask*:*+sent_0**sep+*"
# Causal prompts for the same tasks: the label word is scored as the next token.  These are this
# project's choice (the paper runs the LM-BFF tasks on RoBERTa only): the masked template with
# the mask moved to the end.
_SENTIMENT_CAUSAL = "*cls**sent_0*_It_was"
_THIS_IS_CAUSAL = "*cls**sent_0*_This_is"
_NLI_CAUSAL = "*cls**sent-_0*?*+sentl_1*_Answer:"
_QUESTION_TYPE_CAUSAL = "*cls**sent_0*_Answer_type:"

_BINARY_SENTIMENT = {"0": "terrible", "1": "great"}
_FIVE_SENTIMENT = {"0": "terrible", "1": "bad", "2": "okay", "3": "good", "4": "great"}
_NLI3 = {"contradiction": "No", "entailment": "Yes", "neutral": "Maybe"}
_NLI2 = {"not_entailment": "No", "entailment": "Yes"}
_YES_NO = {"0": "No", "1": "Yes"}


def _single_csv(
    name: str,
    folder: str,
    words: Mapping[str, str],
    template: str = _SENTIMENT,
    causal: str = _SENTIMENT_CAUSAL,
    **extra,
) -> TaskSpec:
    """An LM-BFF single-sentence task stored as header-less ``label,sentence`` CSV files."""
    return TaskSpec(
        name=name,
        lmbff_dir=folder,
        file_format="csv",
        train_file="train.csv",
        test_file="test.csv",
        text_columns=("sentence",),
        label_column="label",
        label_words=words,
        template=template,
        causal_template=causal,
        **extra,
    )


def _glue(
    name: str,
    columns: tuple[str, ...],
    label: str,
    words: Mapping[str, str],
    template: str,
    causal: str,
    *,
    test_file: str = "dev.tsv",
    **extra,
) -> TaskSpec:
    """A GLUE-style task (TSV with a header); LM-BFF uses the GLUE dev set as the test set."""
    return TaskSpec(
        name=name,
        lmbff_dir=name,
        file_format="glue-tsv",
        train_file="train.tsv",
        test_file=test_file,
        text_columns=columns,
        label_column=label,
        label_words=words,
        template=template,
        causal_template=causal,
        **extra,
    )


# Max lengths and sentence limits as in the LM-BFF / MeZO RoBERTa scripts: 128 tokens, 256 for
# the sentence-pair inference tasks; the first sentence is cut to 110 tokens (SST-5, TREC) or 240
# (MNLI, RTE) and the others to 20 (SST-5) before the prompt is assembled.
_PAIR = dict(max_length=256)

TASKS: dict[str, Task] = {
    "SST-2": _glue("SST-2", ("sentence",), "label", _BINARY_SENTIMENT, _SENTIMENT, _SENTIMENT_CAUSAL),
    "SST-5": _single_csv("SST-5", "sst-5", _FIVE_SENTIMENT, first_sent_limit=110, other_sent_limit=20),
    "mr": _single_csv("mr", "mr", _BINARY_SENTIMENT),
    "cr": _single_csv("cr", "cr", _BINARY_SENTIMENT),
    "mpqa": _single_csv("mpqa", "mpqa", _BINARY_SENTIMENT),
    "subj": _single_csv("subj", "subj", {"0": "subjective", "1": "objective"}, _THIS_IS, _THIS_IS_CAUSAL),
    "trec": _single_csv(
        "trec",
        "trec",
        {"0": "Description", "1": "Entity", "2": "Expression", "3": "Human", "4": "Location", "5": "Number"},
        _QUESTION_TYPE,
        _QUESTION_TYPE_CAUSAL,
        first_sent_limit=110,
    ),
    # GLUE CoLA ships without a header: source, label, original label, sentence.
    "CoLA": TaskSpec(
        name="CoLA",
        lmbff_dir="CoLA",
        file_format="tsv-noheader",
        train_file="train.tsv",
        test_file="dev.tsv",
        text_columns=("3",),
        label_column="1",
        label_words={"0": "incorrect", "1": "correct"},
        template=_THIS_IS,
        causal_template=_THIS_IS_CAUSAL,
        metric="mcc",
    ),
    "MNLI": _glue(
        "MNLI",
        ("sentence1", "sentence2"),
        "gold_label",
        _NLI3,
        _NLI,
        _NLI_CAUSAL,
        test_file="dev_matched.tsv",
        first_sent_limit=240,
        **_PAIR,
    ),
    # SNLI marks pairs whose annotators did not agree with gold label "-": they have no label.
    "SNLI": _glue(
        "SNLI", ("sentence1", "sentence2"), "gold_label", _NLI3, _NLI, _NLI_CAUSAL, unlabelled=("-",), **_PAIR
    ),
    "RTE": _glue("RTE", ("sentence1", "sentence2"), "label", _NLI2, _NLI, _NLI_CAUSAL, first_sent_limit=240, **_PAIR),
    "QNLI": _glue("QNLI", ("question", "sentence"), "label", _NLI2, _NLI, _NLI_CAUSAL, **_PAIR),
    "MRPC": _glue("MRPC", ("#1 String", "#2 String"), "Quality", _YES_NO, _PARAPHRASE, _NLI_CAUSAL, metric="f1"),
    "QQP": _glue("QQP", ("question1", "question2"), "is_duplicate", _YES_NO, _PARAPHRASE, _NLI_CAUSAL, metric="f1"),
}
TASKS["demo-sst2"] = replace(TASKS["SST-2"], name="demo-sst2", demo=True)
TASKS["demo-trec"] = replace(TASKS["trec"], name="demo-trec", demo=True)


def get_task(name: str) -> Task:
    """Look a task up by its config name, with an error that lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def make_cell_splits(
    task_name: str,
    out_dir: Path,
    *,
    seed: int,
    k: int,
    data_dir: str | Path,
    max_test: int,
    hf_datasets: dict | None = None,
) -> dict[str, int]:
    """The train/dev/test splits of a cell's data seed, drawn as the task draws them
    (:meth:`Task.make_splits <dpzo.data.task.Task.make_splits>`): LM-BFF k-shot, or MeZO's
    sampling for the Hugging Face tasks (where k is not used: the sizes come from ``hf_datasets``)."""
    sizes = get_task(task_name).make_splits(
        Path(out_dir), seed=int(seed), k=int(k), data_dir=data_dir, max_test=int(max_test), hf_datasets=hf_datasets
    )
    logger.info("split sizes: %s", sizes)
    return sizes


@dataclass(frozen=True)
class TemplatePart:
    """One part of a parsed LM-BFF template (the syntax is in the module docstring)."""

    kind: str  # "cls" | "sep" | "mask" | "text" | "sent"
    text: str = ""
    sent_index: int = 0
    space: bool = False  # "+sent": prepend a space
    lower_first: bool = False  # "sentl": lower-case the first character
    drop_last: bool = False  # "sent-": drop the last character


_SENT = re.compile(r"^(\+)?sent(l)?(-)?_(\d+)$")


def parse_template(template: str) -> list[TemplatePart]:
    """Split an LM-BFF template into typed parts."""
    parts: list[TemplatePart] = []
    for raw in template.split("*"):
        if raw == "":
            continue
        if raw == "cls":
            parts.append(TemplatePart("cls"))
        elif raw in ("sep", "sep+"):
            parts.append(TemplatePart("sep"))
        elif raw == "mask":
            parts.append(TemplatePart("mask"))
        elif (m := _SENT.match(raw)) is not None:
            parts.append(
                TemplatePart(
                    "sent",
                    sent_index=int(m.group(4)),
                    space=m.group(1) is not None,
                    lower_first=m.group(2) is not None,
                    drop_last=m.group(3) is not None,
                )
            )
        else:
            parts.append(TemplatePart("text", text=raw.replace("_", " ")))
    return parts


def _sentence_text(part: TemplatePart, texts: Sequence[str]) -> str:
    text = texts[part.sent_index]
    if part.drop_last:
        text = text[:-1]
    if part.lower_first and text:
        text = text[0].lower() + text[1:]
    if part.space:
        text = " " + text
    return text


def render_template(template: str, texts: Sequence[str], *, cls: str, sep: str, mask: str) -> str:
    """Render a template as a string (for inspection and tests; encoding is done per part)."""
    out = []
    for part in parse_template(template):
        if part.kind == "cls":
            out.append(cls)
        elif part.kind == "sep":
            out.append(sep)
        elif part.kind == "mask":
            out.append(mask)
        elif part.kind == "sent":
            out.append(_sentence_text(part, texts))
        else:
            out.append(part.text)
    return "".join(out)


@dataclass
class EncodedPrompt:
    """A tokenized prompt and the position whose logits score the label words."""

    input_ids: list[int]
    score_position: int  # index whose next-token / mask logits are scored
    truncated: bool = False


def encode_prompt(
    template: str,
    texts: Sequence[str],
    tokenizer,
    *,
    max_length: int,
    causal: bool,
    first_sent_limit: int | None = None,
    other_sent_limit: int | None = None,
) -> EncodedPrompt:
    """Tokenize a prompt part by part (LM-BFF style), truncating the sentences to fit max_length.

    For masked LMs the scored position is the ``<mask>`` token; for causal LMs it is the last
    token of the prompt (its next-token distribution scores the label words).  Sentence 0 is
    first cut to ``first_sent_limit`` tokens and the others to ``other_sent_limit`` (LM-BFF).
    """
    parts = parse_template(template)
    segments: list[tuple[TemplatePart, list[int]]] = []
    for part in parts:
        if part.kind == "cls":
            tok_id = tokenizer.bos_token_id if causal else tokenizer.cls_token_id
            if tok_id is None:
                tok_id = tokenizer.bos_token_id
            ids = [] if tok_id is None else [tok_id]
        elif part.kind == "sep":
            tok_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
            ids = [tok_id]
        elif part.kind == "mask":
            if tokenizer.mask_token_id is None:
                raise ValueError("template has *mask* but the tokenizer has no mask token; use causal_template")
            ids = [tokenizer.mask_token_id]
        elif part.kind == "sent":
            ids = tokenizer.encode(_sentence_text(part, texts), add_special_tokens=False)
            limit = first_sent_limit if part.sent_index == 0 else other_sent_limit
            if limit is not None:
                ids = ids[:limit]
        else:
            ids = tokenizer.encode(part.text, add_special_tokens=False)
        segments.append((part, ids))

    total = sum(len(ids) for _, ids in segments)
    truncated = False
    if total > max_length:
        # Cut the longest sentence segments first (from their end) so the template survives.
        excess = total - max_length
        sent_slots = sorted(
            (i for i, (p, _) in enumerate(segments) if p.kind == "sent"),
            key=lambda i: -len(segments[i][1]),
        )
        for i in sent_slots:
            if excess <= 0:
                break
            part, ids = segments[i]
            cut = min(excess, max(len(ids) - 1, 0))
            segments[i] = (part, ids[: len(ids) - cut])
            excess -= cut
        if excess > 0:
            raise ValueError(f"max_length={max_length} is too short for the template {template!r}")
        truncated = True

    input_ids: list[int] = []
    score_position = -1
    for part, ids in segments:
        if part.kind == "mask":
            score_position = len(input_ids)
        input_ids.extend(ids)
    if causal:
        score_position = len(input_ids) - 1
    if score_position < 0:
        raise ValueError(f"template {template!r} has no *mask* for a masked LM")
    return EncodedPrompt(input_ids=input_ids, score_position=score_position, truncated=truncated)


def label_word_ids(task: TaskSpec, tokenizer) -> list[int]:
    """Token ids of " word" for each label, in label order; each must be exactly one token."""
    ids = []
    for label, word in task.label_words.items():
        toks = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(toks) != 1:
            raise ValueError(
                f"task {task.name}: label word {word!r} (label {label}) is {len(toks)} tokens "
                f"{toks} in this tokenizer; label words must be single tokens (with a leading space)"
            )
        ids.append(toks[0])
    return ids


# ---- MeZO / DPZero tasks for causal LMs (Hugging Face datasets): defined in dpzo.data.hf_tasks ----
from dpzo.data.hf_tasks import MEZO_TASKS  # noqa: E402  (after TASKS: hf_tasks imports nothing from here)

TASKS.update(MEZO_TASKS)
