"""Scoring the MeZO tasks with a causal LM: candidates by their tokens' log-probability, answers by greedy decoding.

A candidate's score is the *mean* log-probability of its tokens given the prompt (MeZO's
length-normalised score, ``log_probs.mean()``), each token's probability taken from a softmax
over the whole vocabulary.  Per example:

* classification tasks: the loss is the cross-entropy of the candidates' scores against the
  gold candidate (MeZO's ``--train_as_classification``); the prediction is their argmax;
* teacher-forced tasks (COPA, ReCoRD, SQuAD, DROP): the loss is the mean negative
  log-likelihood of the gold continuation's tokens, i.e. minus its score.  COPA and ReCoRD are
  still evaluated by the argmax over their candidates; SQuAD and DROP by greedy decoding
  (at most 50 new tokens, stopping at a newline or end of sequence), scored with SQuAD's
  normalized F1 and exact match against every gold answer.

Tokenization follows MeZO's ``encode_prompt``: the prompt and the prompt-plus-candidate strings
are tokenized whole (BOS first); the candidate's tokens are the last ``len(full) - len(prompt)``
tokens of the full encoding; sequences longer than ``max_length`` lose tokens from the left,
after the BOS.  (MeZO also forces OPT's BOS to id 0, ``<s>``; here it is the tokenizer's own,
``</s>`` for OPT, the token OPT was pretrained with.)

Only what the scores need is computed: the model reads each *distinct* input once (the
candidates of SST-2, RTE, BoolQ... differ only in their single last token, so their inputs
``full[:-1]`` are the same prompt: one forward per example instead of one per candidate), and
the LM head is applied only at the positions that predict candidate tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpzo.data.hf_tasks import HFTask, render_full, render_prompt
from dpzo.data.splits import Example
from dpzo.data.task import CANDIDATE_SCORER, PROMPT_SCORER, Task
from dpzo.models.classifier import pad_token_id
from dpzo.models.qa_metrics import exact_match, f1_score

MAX_NEW_TOKENS = 50  # MeZO's generation length
STOP_TEXT = "\n"  # generation ends at the first newline (MeZO's eos_token)
HEAD_CHUNK = 2048  # LM-head rows per chunk: bounds the [positions, vocabulary] buffer


@dataclass
class Candidate:
    """One candidate continuation of an encoded example: the input it is read from and its tokens."""

    row: int  # which of the example's distinct inputs the candidate is read from
    start: int  # position whose next-token distribution predicts targets[0]
    targets: list[int]  # the candidate's tokens


@dataclass
class EncodedExample:
    """A tokenized MeZO example: its distinct model inputs and the candidates scored on them."""

    rows: list[list[int]]  # distinct model inputs
    candidates: list[Candidate]
    label: int  # the gold candidate (the teacher-forcing target)
    correct: tuple[int, ...]  # candidates counted as a correct prediction
    prompt: list[int] | None = None  # generation input (QA)
    answers: list[str] | None = None  # gold answers (QA)


class CandidateSet:
    """A tokenized split of a MeZO task, batched on demand.

    ``batch(index)`` gives, for the examples ``index``, the padded distinct inputs and the
    positions/targets of their candidates: all candidates, or only the gold one when
    ``gold_only`` (the default of a teacher-forced task, so the trainer's batches run only the
    gold continuation).
    """

    def __init__(self, examples: list[EncodedExample], pad_id: int, *, gold_only: bool):
        self.examples = examples
        self.pad_id = pad_id
        self.gold_only = gold_only

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, rows: Sequence[int]) -> CandidateSet:
        """The examples ``rows`` (repeats allowed), as a set of their own."""
        return CandidateSet([self.examples[int(i)] for i in rows], self.pad_id, gold_only=self.gold_only)

    def batch(
        self, index: torch.Tensor | Sequence[int], device: str | torch.device = "cpu", *, gold_only: bool | None = None
    ) -> dict:
        """The tensors for the examples ``index``, on ``device``.

        The padded distinct inputs (``input_ids``, ``attention_mask``); per candidate token its input row,
        position, id and candidate (``target_*``); per candidate its example, slot and length (``cand_*``);
        the examples' ``labels``.  ``gold_only`` (default: the set's) keeps only each gold candidate.
        """
        gold_only = self.gold_only if gold_only is None else gold_only
        rows: list[list[int]] = []
        t_row, t_pos, t_ids, t_cand = [], [], [], []
        c_example, c_slot, c_len, labels = [], [], [], []
        for b, i in enumerate(torch.as_tensor(index, dtype=torch.long).tolist()):
            ex = self.examples[i]
            slots = [ex.label] if gold_only else range(len(ex.candidates))
            row_of: dict[int, int] = {}
            for slot in slots:
                cand = ex.candidates[slot]
                if cand.row not in row_of:
                    row_of[cand.row] = len(rows)
                    rows.append(ex.rows[cand.row])
                c = len(c_example)
                n = len(cand.targets)
                t_row += [row_of[cand.row]] * n
                t_pos += range(cand.start, cand.start + n)
                t_ids += cand.targets
                t_cand += [c] * n
                c_example.append(b)
                c_slot.append(slot)
                c_len.append(n)
            labels.append(ex.label)
        width = max((len(r) for r in rows), default=1)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, seq in enumerate(rows):
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[r, : len(seq)] = 1

        def tensor(values) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.long, device=device)

        return {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "target_row": tensor(t_row),
            "target_pos": tensor(t_pos),
            "target_ids": tensor(t_ids),
            "target_cand": tensor(t_cand),
            "cand_example": tensor(c_example),
            "cand_slot": tensor(c_slot),
            "cand_len": tensor(c_len),
            "labels": tensor(labels),
            "gold_only": gold_only,
        }


class CandidateScorer:
    """A causal LM scoring a MeZO task; the same interface as ``models.PromptClassifier``."""

    def __init__(self, model, tokenizer, task: HFTask, *, max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.family = "causal"
        self.task = task
        positions = getattr(model.config, "max_position_embeddings", None)
        limit = max_length or task.max_length
        self.max_length = min(limit, positions) if positions else limit
        self.device = next(model.parameters()).device
        self.head = model.get_output_embeddings()
        self.pad_id = pad_token_id(tokenizer)
        stops = tokenizer.encode(STOP_TEXT, add_special_tokens=False)[:1]
        self.stop_ids = stops + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])

    # ---------------------------------------------------------------- tokenization

    def _ids(self, text: str) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return ([] if bos is None else [bos]) + self.tokenizer.encode(text, add_special_tokens=False)

    def _truncate(self, ids: list[int], limit: int) -> list[int]:
        """Keep the last tokens (MeZO), and the BOS in front of them."""
        if len(ids) <= limit:
            return ids
        keep_bos = self.tokenizer.bos_token_id is not None
        return ids[:1] + ids[len(ids) - (limit - 1) :] if keep_bos else ids[len(ids) - limit :]

    def candidate_strings(self, ex: Example) -> list[str]:
        """The continuations of ``ex``: the gold answer for a generation task, else its own or the task's candidates."""
        if self.task.generation:
            return [ex.answers[ex.label]]
        return list(ex.candidates) if ex.candidates is not None else list(self.task.candidates)

    def encode_example(self, ex: Example) -> EncodedExample:
        """Tokenize ``ex`` as MeZO does; raises ValueError when a candidate adds no token or does not fit."""
        prompt_len = len(self._ids(render_prompt(self.task, ex.texts)))
        rows: dict[tuple[int, ...], int] = {}
        candidates = []
        strings = self.candidate_strings(ex)
        for text in strings:
            full = self._ids(render_full(self.task, ex.texts, text))
            n = len(full) - prompt_len
            if n < 1:
                raise ValueError(f"task {self.task.name}: candidate {text!r} adds no token to the prompt")
            full = self._truncate(full, self.max_length)
            if n > len(full) - 1:
                raise ValueError(
                    f"task {self.task.name}: candidate {text!r} ({n} tokens) does not fit max_length={self.max_length}"
                )
            model_input = tuple(full[:-1])  # the last token is only ever a target
            row = rows.setdefault(model_input, len(rows))
            candidates.append(Candidate(row=row, start=len(full) - 1 - n, targets=full[len(full) - n :]))
        if ex.answers is not None and not self.task.generation:
            correct = tuple(k for k, text in enumerate(strings) if text in ex.answers)
        else:
            correct = (ex.label,)
        prompt = None
        if self.task.generation:
            prompt = self._truncate(self._ids(render_prompt(self.task, ex.texts)), self.max_length - MAX_NEW_TOKENS)
        return EncodedExample(
            rows=[list(r) for r in rows],
            candidates=candidates,
            label=ex.label,
            correct=correct,
            prompt=prompt,
            answers=ex.answers,
        )

    def encode(self, examples: list[Example]) -> CandidateSet:
        """Tokenize ``examples``; a teacher-forced task's set batches only the gold candidates by default."""
        return CandidateSet(
            [self.encode_example(ex) for ex in examples], self.pad_id, gold_only=not self.task.train_as_classification
        )

    # ---------------------------------------------------------------- scores and losses

    def candidate_scores(self, batch: dict) -> torch.Tensor:
        """[C] mean log-probability of each candidate in the batch (float32)."""
        hidden = self.model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        # a placed model's last layer and head may sit on other devices than its inputs: the
        # scored rows go to the head, the scores come back to the inputs' device
        head_device = next(self.head.parameters()).device
        rows = hidden[batch["target_row"].to(hidden.device), batch["target_pos"].to(hidden.device)].to(head_device)
        target_ids = batch["target_ids"].to(head_device)
        picked = []
        for start in range(0, rows.shape[0], HEAD_CHUNK):
            logits = self.head(rows[start : start + HEAD_CHUNK]).float()
            targets = target_ids[start : start + HEAD_CHUNK]
            picked.append(logits.log_softmax(dim=-1).gather(1, targets[:, None].to(logits.device)).squeeze(1))
        token_logprobs = (
            torch.cat(picked).to(self.device) if picked else torch.zeros(0, dtype=torch.float32, device=self.device)
        )
        sums = torch.zeros(batch["cand_len"].shape[0], dtype=torch.float32, device=self.device)
        sums.index_add_(0, batch["target_cand"], token_logprobs)
        return sums / batch["cand_len"].float()

    def score_matrix(self, batch: dict, scores: torch.Tensor | None = None) -> torch.Tensor:
        """[B, K_max] candidate scores per example; -inf where an example has fewer candidates."""
        scores = self.candidate_scores(batch) if scores is None else scores
        width = int(batch["cand_slot"].max()) + 1 if scores.numel() else 1
        out = torch.full((batch["labels"].shape[0], width), float("-inf"), device=scores.device)
        out[batch["cand_example"], batch["cand_slot"]] = scores
        return out

    def per_example_loss(self, batch: dict) -> torch.Tensor:
        """[B] training loss of each example (float32, no reduction)."""
        scores = self.candidate_scores(batch)
        if batch["gold_only"]:
            return -scores  # one candidate per example: the gold continuation's mean NLL
        return F.cross_entropy(self.score_matrix(batch, scores), batch["labels"], reduction="none")

    @property
    def label_ids(self) -> torch.Tensor:
        """Token of each fixed single-token candidate (the label words of DP-ZOPO's objective)."""
        if not self.task.candidates:
            raise ValueError(f"task {self.task.name} has no fixed label words (its candidates come with each example)")
        placeholder = Example(texts=["Text."] * len(self.task.fields), label=0)
        ids = []
        for cand in self.encode_example(placeholder).candidates:
            if len(cand.targets) != 1:
                raise ValueError(
                    f"task {self.task.name}: a candidate is {len(cand.targets)} tokens; label words must be single tokens"
                )
            ids.append(cand.targets[0])
        return torch.tensor(ids, device=self.device)

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, batch_size: int = 32) -> list[str]:
        """Greedy continuations of token-id prompts, cut at the first newline and stripped."""
        texts = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, p in enumerate(chunk):  # left padding: every prompt ends at the same column
                ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                mask[r, width - len(p) :] = 1
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                num_beams=1,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
            )
            for row in out[:, width:].tolist():
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                texts.append(text.split(STOP_TEXT, 1)[0].strip())
        return texts

    # ---------------------------------------------------------------- evaluation

    def _groups(self, data: CandidateSet, batch_size: int, gold_only: bool) -> list[list[int]]:
        """Consecutive examples grouped so that a batch holds about ``batch_size`` candidates."""
        groups, current, count = [], [], 0
        for i, ex in enumerate(data.examples):
            current.append(i)
            count += 1 if gold_only else len(ex.candidates)
            if count >= batch_size:
                groups.append(current)
                current, count = [], 0
        return groups + ([current] if current else [])

    @torch.no_grad()
    def evaluate(self, data: CandidateSet, *, batch_size: int = 128) -> dict:
        """Accuracy (candidates) or F1 / exact match (generation), and the mean training loss."""
        n = len(data)
        if self.task.generation:
            losses = [
                self.per_example_loss(data.batch(g, self.device, gold_only=True))
                for g in self._groups(data, batch_size, True)
            ]
            predictions = self.generate([ex.prompt for ex in data.examples], batch_size=batch_size)
            f1 = [f1_score(p, ex.answers) for p, ex in zip(predictions, data.examples)]
            em = [exact_match(p, ex.answers) for p, ex in zip(predictions, data.examples)]
            return {
                "metric": "f1",
                "f1": sum(f1) / max(n, 1),
                "em": sum(em) / max(n, 1),
                "loss": float(torch.cat(losses).sum()) / max(n, 1) if losses else 0.0,
                "n": n,
                "predictions": predictions[:20],
            }
        k = self.task.num_classes
        confusion = torch.zeros(k, k, dtype=torch.long) if k else None
        correct, total_loss = 0, 0.0
        for group in self._groups(data, batch_size, False):
            batch = data.batch(group, self.device, gold_only=False)
            matrix = self.score_matrix(batch)
            pred = matrix.argmax(dim=1).cpu()
            if self.task.train_as_classification:
                loss = F.cross_entropy(matrix, batch["labels"], reduction="sum")
            else:
                loss = -matrix.gather(1, batch["labels"][:, None]).sum()
            total_loss += float(loss)
            for i, p in zip(group, pred.tolist()):
                correct += p in data.examples[i].correct
            if confusion is not None:
                confusion += torch.bincount(batch["labels"].cpu() * k + pred, minlength=k * k).view(k, k)
        return {
            "metric": "accuracy",
            "accuracy": correct / max(n, 1),
            "loss": total_loss / max(n, 1),
            "n": n,
            "confusion": None if confusion is None else confusion.tolist(),
        }


def make_scorer(model, tokenizer, family: str, task: Task):
    """The scorer the task asks for (``task.scorer``): a ``CandidateScorer`` for the MeZO tasks,
    a ``PromptClassifier`` for the LM-BFF ones."""
    if task.scorer == CANDIDATE_SCORER:
        if family != "causal":
            raise ValueError(
                f"task {task.name} scores continuations with a causal LM; this model is a {family!r} model"
            )
        return CandidateScorer(model, tokenizer, task)
    if task.scorer != PROMPT_SCORER:
        raise ValueError(
            f"task {task.name} asks for the scorer {task.scorer!r}; known: {PROMPT_SCORER}, {CANDIDATE_SCORER}"
        )
    from dpzo.models.classifier import PromptClassifier

    return PromptClassifier(model, tokenizer, family, task)
