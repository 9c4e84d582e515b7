"""The ledger of a cell whose hyperparameters are chosen privately: the whole selection accounted.

Written by the account rule before anything of the cell runs, read and verified by every
candidate run before it trains (:func:`verify_selection_ledger`), as every ledger is.  Besides
what a cell's ledger holds, it records the selection: the distribution of the number of runs
and its parameters, the grid, the validation split's size, the score's noise, and three ε:

* ``selection``: the whole (every candidate run and the release of the best), by the
  Papernot-Steinke RDP bound (``dp_accounting``), the ε the cell's target is met with;
* ``candidate``: one candidate run (training and score) by the same RDP accountant;
* ``training_alone``: one training with this σ by the config's accountant (what the ε of the
  cell would be if its hyperparameters were given): the tables print it beside the selection's.

The number of runs drawn is *not* in the ledger: it is drawn later, is secret, and is never
published (``dpzo.pipeline.tuning``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dpzo.methods import base_method, get_method
from dpzo.privacy.accountants import epsilon
from dpzo.privacy.calibration import memoized
from dpzo.privacy.ledger import (
    EPSILON_RTOL,
    AccountingSettings,
    Cell,
    LedgerMismatch,
    VerifiedNoise,
    _number,
    _require,
    check_counts,
    check_identity,
    resolve_delta,
)
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.records import ADD_REMOVE, library_versions
from dpzo.privacy.selection import (
    CandidateRun,
    Repetitions,
    calibrate_selection_sigma,
    candidate_epsilon,
    selection_epsilon,
)

#: The value of ``calibrated_with`` in a selection's ledger.
SELECTION_ACCOUNTANT = "rdp-selection (Papernot-Steinke, dp_accounting)"


def selection_ledger(
    cell: Cell,
    hp: Any,
    *,
    n_total: int,
    n_validation: int,
    selection: dict[str, Any],
    settings: AccountingSettings,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The ledger of a privately tuned ``cell``: σ calibrated so that the selection meets its ε.

    ``hp``: the method's hyperparameters outside the grid (n, q, T, P, C are the same for every
    candidate); ``n_validation`` of the ``n_total`` training examples are held out, so each
    candidate trains on ``n = n_total - n_validation`` with ``q = B / n``.  ``selection``: the
    ``tune`` block as recorded (``TuneSettings.as_dict``: the distribution of the number of runs
    and the score's noise).
    """
    repetitions, score_noise = selection_parts(selection)
    n = n_total - n_validation
    delta = resolve_delta(settings.delta, n_total)
    compositions = get_method(base_method(cell.method)).compositions(hp)
    run = CandidateRun(q=hp.batch_size / n, compositions=compositions, score_noise=float(score_noise))
    key = dict(
        kind="selection",
        epsilon_target=cell.epsilon,
        delta=delta,
        q=run.q,
        compositions=compositions,
        score_noise=run.score_noise,
        repetitions=repetitions.as_dict(),
        accountant=settings.accountant,
        library_versions=library_versions(),
    )

    def compute() -> dict[str, Any]:
        sigma = calibrate_selection_sigma(cell.epsilon, delta, run, repetitions)
        return {
            "sigma": sigma,
            "epsilon_achieved": {
                "selection": selection_epsilon(run, repetitions, sigma, delta),
                "candidate": candidate_epsilon(run, sigma, delta),
                "training_alone": epsilon(sigma, run.q, compositions, delta, settings.accountant),
            },
        }

    def still_certifies(cached: dict[str, Any]) -> bool:
        return selection_epsilon(run, repetitions, float(cached["sigma"]), delta) <= cell.epsilon

    numbers = memoized(cache_dir, key, compute, verify=still_certifies)
    sigma = float(numbers["sigma"])
    return {
        "private": True,
        "cell": cell.as_dict(),
        "method": cell.method,
        "epsilon_target": cell.epsilon,
        "delta": delta,
        "sigma": sigma,
        "noise_multiplier": sigma,
        "q": run.q,
        "n": n,
        "n_total": n_total,
        "n_validation": n_validation,
        "expected_batch_size": float(hp.batch_size),
        "steps": hp.steps,
        "directions": hp.directions,
        "compositions": compositions,
        "clip": float(hp.clip),
        "sampler": "poisson",
        "neighbouring": ADD_REMOVE,
        "sensitivity": float(hp.clip),
        "mechanism": "gaussian",
        "accounting": "common",
        "noise_std_on_sum": sigma * float(hp.clip),
        # the candidates' score: the validation count plus N(0, score_sigma^2), sensitivity 1
        "score_sigma": float(score_noise) * sigma,
        "selection": selection,
        "calibrated_with": SELECTION_ACCOUNTANT,
        "epsilon_achieved": numbers["epsilon_achieved"],
        "convention": settings.convention,
        "accountant": settings.accountant,
        "noise": settings.noise,
        "library_versions": library_versions(),
    }


def verify_selection_ledger(
    ledger: Any,
    *,
    cell: Cell,
    hp: Any,
    n: int,
    n_validation: int,
    selection: dict[str, Any],
    settings: AccountingSettings,
    path: str | Path | None = None,
) -> tuple[VerifiedNoise, float]:
    """Refuse a selection ledger that is not this cell's or whose noise does not buy its ε.

    ``hp``: a candidate's hyperparameters (its grid point does not change what is checked, but for a
    searched clip C, which must be one of the grid's);
    ``n``: the rows it trains on; ``selection``: the cell's ``tune`` block as recorded.  Returns the
    training's noise and the score's σ.
    """
    repetitions, score_noise = selection_parts(selection)
    check_identity(ledger, cell=cell, settings=settings, path=path)
    counted = ledger
    if isinstance(ledger, dict) and "clip" in selection.get("grid", {}):
        # C searched: σ is a noise multiplier, so every clip of the grid is accounted alike; the
        # candidate's own C must be one of them, and its noise on the sum is σ·C
        clips = selection["grid"]["clip"]
        if not any(math.isclose(float(hp.clip), float(c), rel_tol=1e-12) for c in clips):
            raise LedgerMismatch(path, "clip", hp.clip, f"one of the grid's {clips}")
        sigma = _number(ledger.get("sigma"))
        counted = {**ledger, "clip": hp.clip, "noise_std_on_sum": sigma * float(hp.clip)}
    check_counts(counted, n=n, hp=hp, method=cell.method, path=path)
    ledger = counted
    for key, expected in (
        ("private", True),
        ("mechanism", "gaussian"),
        ("sampler", "poisson"),
        ("neighbouring", ADD_REMOVE),
        ("accounting", "common"),
        ("calibrated_with", SELECTION_ACCOUNTANT),
        ("n_validation", n_validation),
        ("selection", selection),
    ):
        _require(ledger, path, key, expected)
    delta = resolve_delta(settings.delta, n + n_validation)
    if not math.isclose(_number(ledger.get("delta")), delta, rel_tol=1e-12):
        raise LedgerMismatch(path, "delta", ledger.get("delta"), delta)
    sigma = _number(ledger.get("sigma"))
    if not (math.isfinite(sigma) and sigma > 0):
        raise LedgerMismatch(path, "sigma", ledger.get("sigma"), "a finite noise multiplier > 0 (a private cell)")
    for key, value in (("noise_std_on_sum", sigma * hp.clip), ("score_sigma", score_noise * sigma)):
        if not math.isclose(_number(ledger.get(key)), value, rel_tol=1e-12):
            raise LedgerMismatch(path, key, ledger.get(key), value)
    run = CandidateRun(q=hp.batch_size / n, compositions=int(ledger["compositions"]), score_noise=float(score_noise))
    achieved = selection_epsilon(run, repetitions, sigma, delta)
    if not achieved <= cell.epsilon * (1.0 + EPSILON_RTOL):
        raise LedgerMismatch(
            path,
            "epsilon of its selection",
            achieved,
            f"<= {cell.epsilon}",
            fix="its noise does not buy the cell's ε (an edited or foreign ledger); delete it and run the cell "
            "again so that the account rule calibrates this selection's noise",
        )
    release = NoisySum("gaussian", sigma * hp.clip, float(hp.batch_size))
    return VerifiedNoise(release, sigma, achieved, SELECTION_ACCOUNTANT), score_noise * sigma


def selection_parts(selection: dict[str, Any]) -> tuple[Repetitions, float]:
    """The distribution of the number of runs and the score's noise (in units of σ) of a recorded
    ``tune`` block."""
    repetitions = Repetitions(selection["distribution"], float(selection["mean"]), float(selection.get("shape", 1)))
    return repetitions, float(selection["score_noise"])


def recomputed_selection_epsilon(ledger: dict) -> float | str:
    """The ε of the whole selection, recomputed from the ledger's σ, counts and distribution
    (what the tables publish, never its ``epsilon_achieved``); the reason, as text, when the
    ledger cannot be read as a selection."""
    try:
        repetitions, score_noise = selection_parts(ledger["selection"])
        run = CandidateRun(q=_number(ledger["q"]), compositions=int(ledger["compositions"]), score_noise=score_noise)
        return selection_epsilon(run, repetitions, _number(ledger["sigma"]), _number(ledger["delta"]))
    except (KeyError, TypeError, ValueError) as err:
        return f"not computed: {type(err).__name__}: {err}"
