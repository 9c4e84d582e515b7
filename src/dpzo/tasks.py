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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Mapping, Sequence


@dataclass(frozen=True)
class TaskSpec:
    """Everything needed to read a task from disk and turn an example into a prompt."""

    name: str
    lmbff_dir: str  # directory under ``<data_dir>/original/``
    file_format: str  # "glue-tsv" (header line, named columns) | "csv" (no header: label, text...)
    train_file: str
    test_file: str
    text_columns: tuple[str, ...]  # glue-tsv: column names; csv: ignored (columns 1..)
    label_column: str  # glue-tsv only
    label_words: Mapping[str, str]  # label value (as written in the file) -> label word
    template: str  # LM-BFF template for masked LMs
    causal_template: str  # prompt prefix for causal LMs; the label word is the next token
    max_length: int = 128
    metric: str = "accuracy"
    demo: bool = False

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.label_words)

    @property
    def num_classes(self) -> int:
        return len(self.label_words)


_SENTIMENT_TEMPLATE = "*cls**sent_0*_It_was*mask*.*sep+*"
_SENTIMENT_CAUSAL = "*cls**sent_0*_It_was"
_NLI_TEMPLATE = "*cls**sent-_0*?*mask*,*+sentl_1**sep+*"

TASKS: dict[str, TaskSpec] = {
    "SST-2": TaskSpec(
        name="SST-2",
        lmbff_dir="SST-2",
        file_format="glue-tsv",
        train_file="train.tsv",
        test_file="dev.tsv",
        text_columns=("sentence",),
        label_column="label",
        label_words={"0": "terrible", "1": "great"},
        template=_SENTIMENT_TEMPLATE,
        causal_template=_SENTIMENT_CAUSAL,
    ),
    "trec": TaskSpec(
        name="trec",
        lmbff_dir="trec",
        file_format="csv",
        train_file="train.csv",
        test_file="test.csv",
        text_columns=("question",),
        label_column="label",
        label_words={
            "0": "Description",
            "1": "Entity",
            "2": "Expression",
            "3": "Human",
            "4": "Location",
            "5": "Number",
        },
        template="*cls**mask*:*+sent_0**sep+*",
        causal_template="*cls**sent_0*_Answer_type:",
    ),
}
TASKS["demo-sst2"] = replace(TASKS["SST-2"], name="demo-sst2", demo=True)
TASKS["demo-trec"] = replace(TASKS["trec"], name="demo-trec", demo=True)


def get_task(name: str) -> TaskSpec:
    """Look a task up by its config name, with an error that lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


@dataclass(frozen=True)
class TemplatePart:
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
) -> EncodedPrompt:
    """Tokenize a prompt part by part (LM-BFF style), truncating the sentences to fit max_length.

    For masked LMs the scored position is the ``<mask>`` token; for causal LMs it is the last
    token of the prompt (its next-token distribution scores the label words).
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


# ---- MeZO / DPZero tasks for causal LMs (Hugging Face datasets): defined in dpzo.hf_tasks ----
from .hf_tasks import MEZO_TASKS  # noqa: E402  (after TASKS: hf_tasks imports nothing from here)

TASKS.update(MEZO_TASKS)
