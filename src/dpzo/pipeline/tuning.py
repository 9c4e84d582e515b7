"""Choosing a method's hyperparameters inside the cell's guarantee (a method's ``tune`` block).

``private`` (Papernot & Steinke 2022, :mod:`dpzo.privacy.selection`): the cell's ledger is the
selection's; the draw job picks the number of candidate runs ``K`` and each run's grid point from
the secret generator; every candidate is a job of its own (cached, resumable) that trains on the
training rows minus a held-out validation split and scores itself with a noisy count on that
split; the select job reads their records only and publishes the best run as the cell's result.
``K``, the other runs and their scores stay in ``results/tuning`` (never published: the bound
assumes ``K`` is hidden).

``public``: every grid point is a job of its own that trains the method (at the cell's ε, so in
the cell's noise regime) on ``public_task``'s k-shot training set for the cell's seed, and is
scored on that task's dev set without noise; the best point is then trained on the cell's data.
The choice reads no private data, so it costs nothing and the cell's ledger is the usual one.

``none``: the values are given; ``searched_on_private_data: true`` says they came from a search
on this very data, and the tables then mark the result "tuned outside the guarantee".

Light module: no torch, no accountant at import.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpzo.fileio import read_json_output, write_json_atomic
from dpzo.methods import TRAINER_ZO, base_method, get_method, hyperparameters_for, is_private

#: Hyperparameters a grid may not vary: they change what is accounted (q, T·P), which the cell's
#: ledger records once.  The clip C may vary: σ is a noise multiplier, so every C is accounted
#: alike (a private candidate adds σ·C of its own; a public choice is made before the ledger).
ACCOUNTED = ("steps", "batch_size", "directions")

#: The modes of a ``tune`` block.
MODES = ("private", "public", "none")

#: The tables' mark on a result whose hyperparameters were searched on the same data.
OUTSIDE_GUARANTEE = "tuned outside the guarantee"


@dataclass(frozen=True)
class TuneSettings:
    """A method's ``tune`` block, with the schema's defaults."""

    mode: str
    grid: dict[str, list] = field(default_factory=dict)
    validation: float = 0.2
    distribution: str = "truncated-negative-binomial"
    mean: float = 3.0
    shape: float = 1.0
    score_noise: float = 2.0
    searched_on_private_data: bool = False
    public_task: str | None = None

    @classmethod
    def from_params(cls, params: dict | None) -> TuneSettings | None:
        """The ``tune`` block of a method's config block, or None when it has none."""
        block = (params or {}).get("tune")
        if block is None:
            return None
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(block) - known)
        if unknown:
            raise ValueError(f"tune: unknown keys {unknown}; allowed: {sorted(known)}")
        return cls(**{key: (dict(value) if key == "grid" else value) for key, value in block.items()})

    @property
    def private(self) -> bool:
        return self.mode == "private"

    def repetitions(self) -> Any:
        """The distribution of the number of candidate runs (:class:`~dpzo.privacy.selection.Repetitions`)."""
        from dpzo.privacy.selection import Repetitions

        return Repetitions(self.distribution, float(self.mean), float(self.shape))

    def points(self) -> list[dict]:
        """Every point of the grid, in the order of its keys then of their values."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]

    def as_dict(self) -> dict[str, Any]:
        """The block as ledgers and metrics record it."""
        return {
            "mode": self.mode,
            "grid": self.grid,
            "validation": self.validation,
            **self.repetitions().as_dict(),
            "score": "noisy count of correct validation predictions",
            "score_noise": self.score_noise,
        }


def tune_problems(method: str, params: dict) -> list[str]:
    """What is wrong with a method's ``tune`` block, phrased with the fix (empty: nothing)."""
    try:
        tune = TuneSettings.from_params(params)
    except (TypeError, ValueError) as err:
        return [f"methods.{method}.tune: {err}"]
    if tune is None:
        return []
    where = f"methods.{method}.tune"
    if tune.mode not in MODES:
        return [f"{where}.mode must be one of {', '.join(MODES)}; got {tune.mode!r}"]
    if tune.mode == "none":
        return [f"{where}.grid is only read in modes private and public; remove it"] if tune.grid else []
    mode_problems = _private_problems if tune.private else _public_problems
    problems = mode_problems(method, tune)
    return problems + _grid_problems(method, params, tune) if not problems else problems


def _private_problems(method: str, tune: TuneSettings) -> list[str]:
    where, spec = f"methods.{method}.tune", get_method(base_method(method))
    problems = []
    if not is_private(base_method(method)) or spec.mechanism != "gaussian" or spec.trainer != TRAINER_ZO:
        problems.append(
            f"{where}: mode private needs a private zeroth-order method with Gaussian noise "
            f"(dp-zoso, dp-zopo, dpzero, dp-zo-gauss, dp-aggzo); {method} is not one"
        )
    try:
        tune.repetitions()
    except ValueError as err:
        problems.append(f"{where}: {err}")
    if tune.distribution == "poisson":
        problems.append(
            f"{where}.distribution: a Poisson number of runs can be 0, and a cell that releases no model has no "
            "row in the tables yet; use truncated-negative-binomial (K >= 1; shape 1 is the geometric)"
        )
    return problems


def _public_problems(method: str, tune: TuneSettings) -> list[str]:
    from dpzo.data.tasks import TASKS

    where = f"methods.{method}.tune"
    problems = []
    if get_method(base_method(method)).trainer != TRAINER_ZO:
        problems.append(f"{where}: mode public needs a zeroth-order method; {method} is not one")
    if tune.public_task not in TASKS:
        problems.append(
            f"{where}.public_task: mode public needs the task to choose on (one of {', '.join(sorted(TASKS))}); "
            f"got {tune.public_task!r}"
        )
    return problems


def _grid_problems(method: str, params: dict, tune: TuneSettings) -> list[str]:
    """The grid of a private or public choice: present, free of what the ledger accounts, and
    every point a valid setting of the method."""
    where, base = f"methods.{method}.tune", base_method(method)
    if not tune.grid:
        return [f"{where}.grid: mode {tune.mode} needs a grid (e.g. grid: {{lr: [1.0e-4, 5.0e-4, 1.0e-3]}})"]
    problems = [
        f"{where}.grid.{key}: {key} changes what the cell's ledger accounts; give it once in "
        f"methods.{method} and search the other hyperparameters"
        for key in tune.grid
        if key in ACCOUNTED
    ]
    for point in [] if problems else tune.points():
        try:
            get_method(base).hyperparameters_from({**_without_tune(params), **point})
        except (TypeError, ValueError) as err:
            return [f"{where}.grid: the point {point} is not a valid {base} setting ({err})"]
    return problems


def publicly_tuned(params: dict | None) -> str | None:
    """The public task a method's hyperparameters are chosen on, or None."""
    tune = TuneSettings.from_params(params)
    return tune.public_task if tune is not None and tune.mode == "public" else None


def choose_on_public_data(cell: Any, method_params: dict, *, candidates: list[str], path: str | Path) -> dict:
    """The grid point whose run on the public task scored best on its dev set (the first on a tie)."""
    tune = TuneSettings.from_params(method_params)
    records = [read_json_output(c) for c in candidates]
    points = tune.points()
    if [r["candidate"]["point"] for r in records] != points:
        raise ValueError(f"the public candidates {candidates} are not the grid {points}; delete them and rerun")
    best = best_candidate(records)
    choice = {
        "mode": "public",
        "public_task": tune.public_task,
        "selected": points[best],
        "score": records[best]["candidate"]["score"],
        "n_validation": records[best]["candidate"]["n_validation"],
        "grid_points": len(points),
        "scores": [r["candidate"]["score"] for r in records],
        "cell": cell.as_dict(),
    }
    write_json_atomic(Path(path), choice)
    return choice


def chosen_params(cell: Any, method_params: dict, choice_path: str | Path) -> tuple[dict, dict]:
    """A publicly tuned cell's method block with the chosen point, and what its metrics publish."""
    choice = read_json_output(choice_path)
    if choice.get("cell") != cell.as_dict():
        raise ValueError(f"{choice_path} is the choice of {choice.get('cell')}, not of {cell.as_dict()}; delete it")
    published = {
        key: choice[key] for key in ("mode", "public_task", "selected", "score", "n_validation", "grid_points")
    }
    return candidate_params(method_params, choice["selected"]), published


def _without_tune(params: dict) -> dict:
    return {key: value for key, value in params.items() if key != "tune"}


def candidate_params(params: dict, point: dict) -> dict:
    """A candidate's method block: the method's values with its grid point's in their place."""
    return {**_without_tune(params), **point}


def validation_rows(n: int, fraction: float, seed: int) -> np.ndarray:
    """The held-out validation rows of a training set of ``n`` (sorted), from a public seed.

    Which rows are held out does not depend on the data, only on ``n`` and the cell's seed, so
    it costs no privacy; their number is in the ledger."""
    count = int(round(fraction * n))
    if not 1 <= count < n:
        raise ValueError(
            f"tune.validation={fraction} holds out {count} of {n} training examples; choose a fraction that "
            "leaves at least one example on each side"
        )
    rng = np.random.default_rng([int(seed), 0x7E57])
    return np.sort(rng.choice(n, size=count, replace=False))


def split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of a training set of ``n``."""
    held = validation_rows(n, fraction, seed)
    keep = np.ones(n, dtype=bool)
    keep[held] = False
    return np.flatnonzero(keep), held


def draw_candidates(tune: TuneSettings, secret: Any) -> dict[str, Any]:
    """The number of runs and each run's grid point, from the secret generator (never published)."""
    runs = tune.repetitions().sample(secret.uniform())
    points = tune.points()
    return {
        "note": "secret: the number of candidate runs is not covered by the guarantee if published",
        "runs": runs,
        "points": [secret.integer(len(points)) for _ in range(runs)],
        "grid_points": points,
    }


def best_candidate(records: list[dict]) -> int | None:
    """The index of the run with the highest noisy score (the first on a tie), None when no run."""
    if not records:
        return None
    scores = [float(r["candidate"]["score"]) for r in records]
    if not all(math.isfinite(s) for s in scores):
        raise ValueError("a candidate's score is not a finite number; its record is damaged: delete it and rerun")
    return int(np.argmax(scores))


def privately_tuned(params: dict | None) -> bool:
    """Whether a method's config block chooses its hyperparameters by private selection."""
    tune = TuneSettings.from_params(params)
    return tune is not None and tune.private


def _private_tune(params: dict) -> TuneSettings:
    tune = TuneSettings.from_params(params)
    if tune is None or not tune.private:
        raise ValueError("this method's config block has no tune: {mode: private} block")
    return tune


def write_selection_ledger(
    cell: Any, method_params: dict, *, train_file: str | Path, settings: Any, path: str | Path, cache_dir: Any = None
) -> dict:
    """Write a privately tuned cell's ledger (``privacy.selection_ledger``) before any candidate runs."""
    from dpzo.privacy.ledger import count_examples
    from dpzo.privacy.selection_ledger import selection_ledger

    tune = _private_tune(method_params)
    n_total = count_examples(train_file)
    _, held = split_rows(n_total, tune.validation, cell.seed)
    record = selection_ledger(
        cell,
        hyperparameters_for(cell.method, _without_tune(method_params)),
        n_total=n_total,
        n_validation=len(held),
        selection=tune.as_dict(),
        settings=settings,
        cache_dir=cache_dir,
    )
    write_json_atomic(Path(path), record)
    logging.getLogger(__name__).info("selection ledger: %s", record)
    return record


class DrawnBefore(RuntimeError):
    """The cell's selection was drawn before: drawing again is a second run of the mechanism."""


def write_draws(cell: Any, method_params: dict, *, ledger: str | Path, path: str | Path, history: str | Path) -> dict:
    """Draw the number of candidate runs and their points (secret generator) for ``cell``.

    ``history`` (not an output, so Snakemake keeps it) records that this cell's selection was
    drawn; a second draw is refused: a new K and new candidates on the same data would be a second
    run of the selection, which its ledger does not account, and the one published could be the
    better of the two."""
    from dpzo.privacy.ledger import ledger_digest
    from dpzo.privacy.secret import SecretRandom

    history = Path(history)
    secret = SecretRandom.from_environment()
    if history.exists() and secret.is_secure:
        raise DrawnBefore(
            f"the selection of {cell.as_dict()} was drawn before ({history.read_text().strip()}): drawing again "
            "would run the selection a second time on the same data, which its ledger does not account. Keep "
            f"the earlier draw (restore {path}), or delete {history} to start over knowingly"
        )
    draws = draw_candidates(_private_tune(method_params), secret)
    record = {**draws, "cell": cell.as_dict(), "ledger_sha256": ledger_digest(read_json_output(ledger))}
    history.parent.mkdir(parents=True, exist_ok=True)
    history.write_text(f"drawn for ledger {record['ledger_sha256'][:16]}\n")
    write_json_atomic(Path(path), record)
    return record


def read_draws(cell: Any, path: str | Path) -> dict:
    """A cell's draws, refused when they are another cell's."""
    draws = read_json_output(path)
    if draws.get("cell") != cell.as_dict():
        raise ValueError(f"{path} holds the draws of {draws.get('cell')}, not of {cell.as_dict()}; delete it and rerun")
    return draws


@dataclass(frozen=True)
class Candidate:
    """Candidate run ``index`` of a private selection: its grid point and the cell's ``tune`` block."""

    index: int
    point: dict
    tune: TuneSettings

    @property
    def public(self) -> bool:
        """A run on the public task (scored without noise on its dev set)."""
        return self.tune.mode == "public"

    def method_params(self, params: dict) -> dict:
        return candidate_params(params, self.point)


def public_point(cell: Any, method_params: dict, index: int) -> tuple[Any, Candidate]:
    """Grid point ``index``'s run on the public task: its cell (the public task's) and its candidate."""
    import dataclasses

    tune = TuneSettings.from_params(method_params)
    return dataclasses.replace(cell, task=tune.public_task), Candidate(index, tune.points()[index], tune)


def candidate_of(cell: Any, method_params: dict, *, draws: str | Path, index: int) -> Candidate:
    """Run ``index`` of the cell's draws."""
    record = read_draws(cell, draws)
    if not 0 <= index < int(record["runs"]):
        raise ValueError(f"candidate run {index} was not drawn ({draws} draws {record['runs']} runs)")
    point = record["grid_points"][int(record["points"][index])]
    return Candidate(index, point, _private_tune(method_params))


@dataclass(frozen=True)
class VerifiedCandidate:
    """What a candidate run reads once its ledger verified: the rows it trains on and scores on,
    the training's noise and the score's σ."""

    hp: Any
    train_examples: list
    validation_examples: list
    noise: Any
    score_sigma: float


def verify_candidate(
    candidate: Candidate, *, cell: Any, ledger: dict, examples: list, params: dict, settings: Any, path: Any
) -> VerifiedCandidate:
    """Split the cell's training rows and verify the selection's ledger against this candidate."""
    from dpzo.privacy.selection_ledger import verify_selection_ledger

    tune = candidate.tune
    kept, held = split_rows(len(examples), tune.validation, cell.seed)
    hp = hyperparameters_for(cell.method, params)
    noise, score_sigma = verify_selection_ledger(
        ledger,
        cell=cell,
        hp=hp,
        n=len(kept),
        n_validation=len(held),
        selection=tune.as_dict(),
        settings=settings,
        path=path,
    )
    return VerifiedCandidate(hp, [examples[i] for i in kept], [examples[i] for i in held], noise, score_sigma)


def score_candidate(result: dict, *, score_sigma: float, secret: Any, candidate: Candidate) -> dict:
    """The candidate's published-if-chosen score: its correct validation predictions (from the
    evaluation's confusion counts) plus Gaussian noise from the secret generator (none for a run
    on public data)."""
    from dpzo.privacy.selection import noisy_count

    correct = int(sum(row[i] for i, row in enumerate(result["confusion"])))
    score = float(correct) if candidate.public else noisy_count(correct, score_sigma, secret.standard_normal)
    return {
        "index": candidate.index,
        "point": candidate.point,
        "score": score,
        "score_sigma": score_sigma,
        "n_validation": int(result["n"]),
    }


def select(
    cell: Any,
    *,
    ledger: str | Path,
    draws: str | Path,
    candidates: list[str],
    diagnostics: list[str],
    metrics_path: str | Path,
    diagnostics_path: str | Path,
    record_path: str | Path,
) -> dict:
    """Publish the best candidate as the cell's result; keep the rest in a private record.

    Only the candidates' records are read.  The published metrics are the best run's (its test
    evaluation is post-processing of the released model) with the selection's accounting; the
    number of runs, the run's index and the other runs' scores go to ``record_path`` only."""
    from dpzo.privacy.ledger import ledger_digest

    drawn = read_draws(cell, draws)
    ledger_record = read_json_output(ledger)
    if drawn["ledger_sha256"] != ledger_digest(ledger_record):
        raise ValueError(f"{draws} was drawn for another ledger than {ledger}; delete both and rerun the cell")
    records = [read_json_output(path) for path in candidates]
    if len(records) != int(drawn["runs"]):
        raise ValueError(f"{len(records)} candidate records for {drawn['runs']} drawn runs")
    for i, record in enumerate(records):
        same_cell = {key: record.get(key) for key in cell.as_dict()} == cell.as_dict()
        if record.get("candidate", {}).get("index") != i or not same_cell:
            raise ValueError(f"{candidates[i]} is not run {i} of {cell.as_dict()}; delete it and rerun")
    best = best_candidate(records)
    chosen = dict(records[best])
    run = chosen.pop("candidate")
    achieved = ledger_record["epsilon_achieved"]
    chosen["selection"] = {
        "mode": "private",
        "selected": run["point"],
        "score": run["score"],
        "score_sigma": run["score_sigma"],
        "n_validation": run["n_validation"],
        "grid_points": len(drawn["grid_points"]),
        "expected_runs": ledger_record["selection"]["mean"],
        "distribution": ledger_record["selection"]["distribution"],
        "epsilon": achieved["selection"],
        "epsilon_training_alone": achieved["training_alone"],
        "runs_published": False,  # the number of runs is secret: the bound assumes it hidden
    }
    write_json_atomic(
        Path(record_path),
        {
            "note": "secret: the number of runs and the other runs' scores are NOT covered by the guarantee",
            "cell": cell.as_dict(),
            "runs": len(records),
            "best": best,
            "candidates": [{"point": r["candidate"]["point"], "score": r["candidate"]["score"]} for r in records],
        },
    )
    write_json_atomic(Path(diagnostics_path), read_json_output(diagnostics[best]))
    write_json_atomic(Path(metrics_path), chosen)
    return chosen
