"""Empirical privacy audit: a statistical lower bound on the epsilon of a zeroth-order cell.

What is audited
---------------
The release sequence of the zeroth-order trainer for one cell, exactly as its privacy ledger
specifies it: ``T * P`` releases, each a fresh Poisson batch drawn at rate ``q`` by
``SecretRandom.poisson_batch``, the per-example values clipped, summed and noised by
the method's own release rule (:meth:`dpzo.methods.base.PrivateZOMethod.release`, the one the trainer calls, with the ledger's
:class:`~dpzo.privacy.mechanisms.NoisySum`), then divided by the public expected batch size.  Only the
per-example values are synthetic: the audit chooses them, as the DP definition allows an
adversary to choose the whole dataset.

* The background (every example but one) contributes 0 at every release.  Any other known
  background would add sampling variance the auditor cannot remove (the batches are secret),
  so 0 is the strongest choice for the attacker.
* The canary (example 0) contributes ``c_t`` at release ``t``, with ``|c_t| = C`` by default:
  the most one example can move a clipped sum.  For a real zeroth-order model such a canary
  exists (a "Dirac" canary whose loss has a huge slope along one coordinate j: its clipped
  difference is ``C * sign(z_t[j])``), and the auditor knows ``c_t`` because the directions
  ``z_t`` are public.  ``tests/test_audit.py`` checks that :func:`run_mechanism` releases,
  bit for bit, what ``train_zo`` releases on such a canary.
* Neighbouring datasets: with add/remove (the project's relation) the canary is in or absent;
  with replace-one (DPZero's published accounting) the out-world holds an example whose clipped
  value is ``-c_t`` instead.  ``q`` is public and the same in both worlds, as the accountant
  assumes.

The auditor sees every released scalar (white box: the final model is a post-processing of
these and of the public seeds), and knows ``q``, ``n``, ``C``, the noise scale and ``c_t``; it
does not see the batches or the noise.

The attack
----------
Each release is ``x_t = (sum + noise) / C`` after undoing the public normalisation: a mixture
``(1 - q) f(x) + q f(x - a_t)`` in the in-world and the same with ``b_t`` in the out-world
(``a_t = c_t / C``, ``b_t = 0`` or ``-a_t``; ``f`` the Gaussian or Laplace noise density).
The score of a run is the log-likelihood ratio of its whole transcript, the Neyman-Pearson
optimal test between the two worlds (with no noise it is the correlation ``sum_t a_t x_t``).
A loss-based black-box attack would see only the final model's loss on the canary, which a
zeroth-order run moves by a few steps of one scalar each; the transcript test uses everything
that is released.  The one-run audit of Steinke, Nasr and Jagielski (2023) is not used: it
has to tell many canaries apart from the same ``T * P`` scalars, which carry far too little
information at these step counts.

From guesses to epsilon
-----------------------
Half the trials run with the canary, half without; each world's runs are split.  On the first
quarter a threshold (and a direction: "in-world scores high" or "out-world scores low") is
chosen; on the other three quarters alone the true and false positive rates at that threshold
are bounded with Clopper-Pearson intervals, each at level ``(1 - confidence) / 2``.  (epsilon, delta)-DP implies
``TPR <= e^eps FPR + delta`` for every event, hence, with the stated confidence::

    eps >= log((TPR_low - delta) / FPR_high)

With ``N`` evaluation trials per world the largest measurable bound is about ``log(N / 3.7)``
(both rates perfect), which :func:`largest_measurable_epsilon` gives exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # annotations only
    from dpzo.privacy.mechanisms import NoisySum
    from dpzo.privacy.secret import SecretRandom

__all__ = [
    "AuditedMechanism",
    "audit",
    "clopper_pearson",
    "epsilon_lower_bound",
    "largest_measurable_epsilon",
    "likelihood_ratio_scores",
    "run_mechanism",
]

#: The canary's value before clipping, in units of C: far outside [-C, C], so the clip
#: sets it to exactly +-C (what a Dirac canary's huge loss slope does in a real model).
CANARY_SCALE = 1e6

#: Tang et al.'s methods clip 2 beta d and divide the noisy sum by 2 beta afterwards; that
#: division is public post-processing, so the audit uses 2 beta = 1 and audits the sum itself.
AUDIT_BETA = 0.5

#: Fewest trials per world: both parts (threshold choice / evaluation) need a few.
MIN_TRIALS = 8

#: Share of each world's runs that chooses the threshold; the rest measures the bound.
CALIBRATION_FRACTION = 0.25

#: Level of the Clopper-Pearson bounds that rank thresholds on the calibration runs.  Stricter
#: than the reported level, it prefers thresholds whose rates rest on many runs over a lucky
#: tail threshold that the evaluation runs would not confirm (a winner's curse).  Validity does
#: not depend on it: the reported bound uses the evaluation runs only.
SELECTION_ALPHA = 1e-3


class AuditError(ValueError):
    """The ledger or the audit settings cannot be audited (the message says why and the fix)."""


@dataclass(frozen=True)
class AuditedMechanism:
    """The release sequence of one cell, read from its privacy ledger."""

    method: str
    n: int
    q: float
    releases: int
    clip: float
    mechanism: str  # "gaussian" | "laplace"
    noise_scale: float  # on the sum: std (gaussian) or b (laplace); 0 without noise
    divisor: float  # the public expected batch size
    neighbouring: str  # "add/remove" | "replace-one"
    epsilon_claimed: float
    delta: float
    #: releases (each with its own batch) per training step: the trainer draws a step's batches
    #: before any of its noise
    releases_per_step: int = 1

    @classmethod
    def from_ledger(cls, ledger: dict[str, Any]) -> AuditedMechanism:
        """The mechanism a zeroth-order cell's ledger accounts (private, or the sigma = 0 run)."""
        from dpzo.methods import ZO, base_method
        from dpzo.privacy.mechanisms import NoisySum

        if not isinstance(ledger, dict):
            raise AuditError("the ledger must be a JSON object (a cell's privacy.json)")
        method = str(ledger.get("method", ""))
        spec = ZO.get(base_method(method))
        if spec is None or not spec.private:
            private_zo = ", ".join(name for name, m in ZO.items() if m.private)
            raise AuditError(
                f"the audit covers the private zeroth-order methods ({private_zo}); this ledger is "
                f"for {method or 'no method'!r}. Point it at the privacy.json of one of those cells."
            )
        needed = ("n", "q", "steps", "directions", "compositions", "clip", "expected_batch_size", "epsilon_target")
        absent = [key for key in needed if key not in ledger]
        if absent:
            raise AuditError(f"the ledger lacks {absent}; re-create it with the account rule (or dpzo calibrate)")
        try:
            clip = float(ledger["clip"])
            noise = NoisySum.from_ledger(ledger)
            mech = cls(
                method=method,
                n=int(ledger["n"]),
                q=float(ledger["q"]),
                releases=int(ledger["compositions"]),
                clip=clip,
                mechanism=noise.mechanism,
                noise_scale=noise.scale,
                divisor=noise.divisor,
                neighbouring="replace-one"
                if str(ledger.get("neighbouring", "")).startswith("replace")
                else "add/remove",
                epsilon_claimed=float(ledger["epsilon_target"]),
                delta=float(ledger.get("delta") or 0.0),
                releases_per_step=max(1, int(ledger["compositions"]) // max(1, int(ledger["steps"]))),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise AuditError(
                f"the ledger has a missing or malformed value ({err}); re-create it with the account rule"
            ) from None
        if not (math.isfinite(clip) and clip > 0):
            raise AuditError(
                f"the ledger's clip must be finite and > 0 to audit a bounded release; got {ledger['clip']!r}"
            )
        if not (mech.n >= 1 and 0.0 < mech.q <= 1.0 and mech.releases >= 1):
            raise AuditError(
                f"the ledger needs n >= 1, 0 < q <= 1 and at least one release; got n={mech.n}, q={mech.q}, releases={mech.releases}"
            )
        return mech

    @property
    def noise(self) -> NoisySum:
        """The :class:`NoisySum` the trainer releases this mechanism's values through."""
        from dpzo.privacy.mechanisms import NoisySum

        return NoisySum(self.mechanism, self.noise_scale, self.divisor)


def dirac_canary(releases: int, clip: float) -> np.ndarray:
    """The default canary: value ``+CANARY_SCALE * C`` (clipped to +C) at every release."""
    return np.full(int(releases), CANARY_SCALE * float(clip))


def run_mechanism(
    mech: AuditedMechanism, canary_in: bool, secret: SecretRandom, canary_values: np.ndarray | None = None
) -> np.ndarray:
    """One run of the cell's release sequence; returns the ``mech.releases`` released scalars.

    Example 0 is the canary: its (unclipped) value at release t is ``canary_values[t]`` in the
    in-world; in the out-world it is absent (add/remove: contributes 0) or replaced by an
    example of value ``-canary_values[t]`` (replace-one).  Every other example contributes 0.
    Sampling and noise come from ``secret`` through the trainer's own functions.
    """
    import torch

    from dpzo.methods import ZO, base_method

    spec = ZO[base_method(mech.method)]
    values = dirac_canary(mech.releases, mech.clip) if canary_values is None else np.asarray(canary_values, dtype=float)
    if canary_in:
        example0 = values
    else:
        example0 = -values if mech.neighbouring == "replace-one" else np.zeros_like(values)
    noise = mech.noise
    out = np.empty(mech.releases)
    per_step = mech.releases_per_step
    for first in range(0, mech.releases, per_step):
        # as the trainer: every batch of the step, then each release's noise
        releases = range(first, min(first + per_step, mech.releases))
        batches = [secret.poisson_batch(mech.n, mech.q) for _ in releases]  # sorted: the canary comes first
        for t, index in zip(releases, batches):
            d = torch.zeros(len(index), dtype=torch.float64)
            if len(index) and index[0] == 0:
                d[0] = example0[t]
            out[t], _ = spec.release(d, clip=mech.clip, beta=AUDIT_BETA, noise=noise, secret=secret)
    return out


def run_selection(
    mech: AuditedMechanism,
    selection: dict[str, Any],
    canary_in: bool,
    secret: SecretRandom,
    canary_values: np.ndarray | None = None,
) -> np.ndarray:
    """One run of a private selection (``dpzo.privacy.selection``) on the toy problem: K candidate
    runs of the cell's release sequence (K from the ledger's distribution, drawn from ``secret``),
    each scored by a noisy count, and only the best run's transcript released.

    The toy candidate's validation count is how many of its releases point the canary's way: a
    score that tracks the canary's influence, the adversary's best case for making the choice
    itself leak (any count is allowed: the count's sensitivity is to the validation rows, and
    the canary sits in the training rows)."""
    from dpzo.privacy.selection import noisy_count
    from dpzo.privacy.selection_ledger import selection_parts

    repetitions, _ = selection_parts(selection)
    score_sigma = float(selection["score_sigma"])
    best, best_score = np.zeros(mech.releases), -math.inf
    for _ in range(repetitions.sample(secret.uniform())):
        released = run_mechanism(mech, canary_in, secret, canary_values)
        score = noisy_count(int((released > 0).sum()), score_sigma, secret.standard_normal)
        if score > best_score:
            best, best_score = released, score
    return best


def likelihood_ratio_scores(
    released: np.ndarray, mech: AuditedMechanism, canary_values: np.ndarray | None = None
) -> np.ndarray:
    """Log-likelihood ratio (in-world over out-world) of each run's transcript.

    ``released``: [runs, releases] scalars.  The auditor undoes the public normalisation
    (``x = g * divisor / C``) and, for each release, compares the two mixtures the canary can
    produce given that it is sampled with probability q.  Without noise the ratio is
    degenerate and the score is the correlation ``sum_t a_t x_t`` (exactly 0 in the out-world
    under add/remove, positive in the in-world whenever the canary was sampled).
    """
    values = dirac_canary(mech.releases, mech.clip) if canary_values is None else np.asarray(canary_values, dtype=float)
    a = np.clip(values, -mech.clip, mech.clip) / mech.clip  # the canary's clipped value, units of C
    b = -a if mech.neighbouring == "replace-one" else np.zeros_like(a)
    x = np.atleast_2d(np.asarray(released, dtype=float)) * (mech.divisor / mech.clip)
    s = mech.noise_scale / mech.clip
    if s == 0.0:
        return x @ a

    def log_ratio(shift: np.ndarray) -> np.ndarray:  # log f(x - shift) - log f(x)
        if mech.mechanism == "gaussian":
            return (2.0 * shift * x - shift**2) / (2.0 * s**2)
        return (np.abs(x) - np.abs(x - shift)) / s

    with np.errstate(divide="ignore"):  # q = 1: log(1 - q) = -inf is handled by logaddexp
        keep, take = math.log1p(-mech.q) if mech.q < 1 else -math.inf, math.log(mech.q)
    llr_in = np.logaddexp(keep, take + log_ratio(a))
    llr_out = np.logaddexp(keep, take + log_ratio(b))
    return (llr_in - llr_out).sum(axis=1)


def clopper_pearson(k: np.ndarray | int, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper-Pearson bounds on a binomial rate, each holding with prob. 1 - alpha.

    Returns (lower, upper) for ``k`` successes out of ``n``: lower = 0 at k = 0 and upper = 1
    at k = n, otherwise the beta quantiles.
    """
    from scipy import stats

    k = np.asarray(k, dtype=float)
    with np.errstate(invalid="ignore"):
        lower = np.where(k > 0, stats.beta.ppf(alpha, k, n - k + 1), 0.0)
        upper = np.where(k < n, stats.beta.ppf(1.0 - alpha, k + 1, n - k), 1.0)
    return lower, upper


def _epsilon_from_rates(p_low: np.ndarray, q_high: np.ndarray, delta: float) -> np.ndarray:
    """log((p_low - delta) / q_high), and -inf where p_low <= delta (no evidence)."""
    gap = np.asarray(p_low, dtype=float) - delta
    with np.errstate(divide="ignore"):
        return np.where(gap > 0, np.log(np.maximum(gap, 1e-300)) - np.log(q_high), -np.inf)


def _event_counts(
    scores_in: np.ndarray, scores_out: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """How many in-world and out-world scores are >= each threshold."""
    s_in, s_out = np.sort(scores_in), np.sort(scores_out)
    above_in = len(s_in) - np.searchsorted(s_in, thresholds, side="left")
    above_out = len(s_out) - np.searchsorted(s_out, thresholds, side="left")
    return above_in, above_out


def _bounds(above_in, above_out, n_in: int, n_out: int, alpha: float, delta: float) -> dict[str, np.ndarray]:
    """The epsilon bound of both directions at given counts (each CP bound at level alpha/2)."""
    half = alpha / 2.0
    tpr_low, _ = clopper_pearson(above_in, n_in, half)
    _, fpr_high = clopper_pearson(above_out, n_out, half)
    tnr_low, _ = clopper_pearson(n_out - np.asarray(above_out), n_out, half)
    _, fnr_high = clopper_pearson(n_in - np.asarray(above_in), n_in, half)
    return {
        "in_high": _epsilon_from_rates(tpr_low, fpr_high, delta),  # event: score >= threshold
        "out_low": _epsilon_from_rates(tnr_low, fnr_high, delta),  # event: score < threshold
        "tpr_low": tpr_low,
        "fpr_high": fpr_high,
        "tnr_low": tnr_low,
        "fnr_high": fnr_high,
    }


def largest_measurable_epsilon(trials_per_world: int, confidence: float, delta: float) -> float:
    """The bound with perfectly separated evaluation trials: the ceiling of this audit's size."""
    half = (1.0 - confidence) / 2.0
    p_low = half ** (1.0 / trials_per_world)  # CP lower bound at k = n
    q_high = 1.0 - half ** (1.0 / trials_per_world)  # CP upper bound at k = 0
    return float(max(math.log((p_low - delta) / q_high), 0.0)) if p_low > delta else 0.0


def epsilon_lower_bound(
    scores_in: np.ndarray, scores_out: np.ndarray, *, delta: float, confidence: float = 0.95
) -> dict[str, Any]:
    """Turn the scores of in-world and out-world runs into an epsilon lower bound.

    The first ``CALIBRATION_FRACTION`` of each world's runs chooses the threshold and the
    direction that give the largest bound there; the remaining runs alone measure the rates at
    that threshold, so the bound holds with probability ``confidence`` (Clopper-Pearson on each
    rate at ``(1 - confidence) / 2``, Bonferroni).
    """
    scores_in, scores_out = np.asarray(scores_in, dtype=float), np.asarray(scores_out, dtype=float)
    if min(len(scores_in), len(scores_out)) < MIN_TRIALS:
        raise AuditError(f"need at least {MIN_TRIALS} runs per world; got {len(scores_in)} and {len(scores_out)}")
    if not (0.0 < confidence < 1.0):
        raise AuditError(f"confidence must satisfy 0 < confidence < 1; got {confidence!r}")
    alpha = 1.0 - confidence
    cut_in, cut_out = int(len(scores_in) * CALIBRATION_FRACTION), int(len(scores_out) * CALIBRATION_FRACTION)
    if min(cut_in, cut_out) < 2:
        raise AuditError(f"need at least {MIN_TRIALS} runs per world; got {len(scores_in)} and {len(scores_out)}")
    cal_in, eval_in = scores_in[:cut_in], scores_in[cut_in:]
    cal_out, eval_out = scores_out[:cut_out], scores_out[cut_out:]

    thresholds = np.unique(np.concatenate([cal_in, cal_out]))
    cal = _bounds(*_event_counts(cal_in, cal_out, thresholds), len(cal_in), len(cal_out), 2 * SELECTION_ALPHA, delta)
    best_high, best_low = int(np.argmax(cal["in_high"])), int(np.argmax(cal["out_low"]))
    if cal["in_high"][best_high] >= cal["out_low"][best_low]:
        direction, threshold = "in-world scores high", float(thresholds[best_high])
    else:
        direction, threshold = "out-world scores low", float(thresholds[best_low])

    above_in, above_out = _event_counts(eval_in, eval_out, np.array([threshold]))
    ev = _bounds(above_in, above_out, len(eval_in), len(eval_out), alpha, delta)
    n_in, n_out = len(eval_in), len(eval_out)
    k_in, k_out = int(above_in[0]), int(above_out[0])
    if direction == "in-world scores high":
        eps, p_hat, q_hat = ev["in_high"][0], k_in / n_in, k_out / n_out
        p_low, q_high = ev["tpr_low"][0], ev["fpr_high"][0]
    else:
        eps, p_hat, q_hat = ev["out_low"][0], (n_out - k_out) / n_out, (n_in - k_in) / n_in
        p_low, q_high = ev["tnr_low"][0], ev["fnr_high"][0]
    if p_hat <= delta:
        point: float | str = 0.0
    elif q_hat == 0:
        point = "inf"  # no false positive among the evaluation runs
    else:
        point = max(math.log((p_hat - delta) / q_hat), 0.0)
    return {
        "epsilon_lower_bound": float(max(eps, 0.0)),
        "epsilon_point_estimate": point,
        "direction": direction,
        "threshold": threshold,
        "rate_of_event_in_the_world_it_favours": p_hat,
        "rate_of_event_in_the_other_world": q_hat,
        "rate_lower_bound": float(p_low),
        "other_rate_upper_bound": float(q_high),
        "evaluation_runs_per_world": [n_in, n_out],
        "calibration_runs_per_world": [len(cal_in), len(cal_out)],
        "confidence": confidence,
        "largest_measurable_epsilon": largest_measurable_epsilon(min(n_in, n_out), confidence, delta),
    }


def audit(
    ledger: dict[str, Any],
    *,
    trials: int,
    confidence: float = 0.95,
    secret: SecretRandom | None = None,
    canary_values: np.ndarray | None = None,
) -> dict[str, Any]:
    """Audit the cell that ``ledger`` accounts with ``trials`` runs (half with the canary).

    ``secret`` draws batches and noise (default: ``SecretRandom.from_environment()``, secure
    unless the test-only seed variable is set).  Returns the audit record (``audit.json``).
    """
    from dpzo.privacy.secret import SecretRandom

    mech = AuditedMechanism.from_ledger(ledger)
    trials = int(trials)
    if trials < 2 * MIN_TRIALS:
        raise AuditError(f"trials must be at least {2 * MIN_TRIALS} (half of them with the canary); got {trials}")
    if not (0.0 < float(confidence) < 1.0):
        raise AuditError(f"confidence must satisfy 0 < confidence < 1; got {confidence!r}")
    if canary_values is not None and len(canary_values) != mech.releases:
        raise AuditError(f"canary_values needs one value per release ({mech.releases}); got {len(canary_values)}")
    secret = SecretRandom.from_environment() if secret is None else secret
    per_world = trials // 2
    started = time.perf_counter()
    selection = None
    if ledger.get("selection") and mech.noise_scale > 0:  # a private selection: audit the whole
        selection = {**ledger["selection"], "score_sigma": ledger["score_sigma"]}

    def one_run(canary_in: bool) -> np.ndarray:
        if selection is None:
            return run_mechanism(mech, canary_in, secret, canary_values)
        return run_selection(mech, selection, canary_in, secret, canary_values)

    runs_in = np.stack([one_run(True) for _ in range(per_world)])
    runs_out = np.stack([one_run(False) for _ in range(per_world)])
    scores_in = likelihood_ratio_scores(runs_in, mech, canary_values)
    scores_out = likelihood_ratio_scores(runs_out, mech, canary_values)
    result = epsilon_lower_bound(scores_in, scores_out, delta=mech.delta, confidence=float(confidence))
    claimed = mech.epsilon_claimed
    return {
        "method": mech.method,
        "epsilon_claimed": "inf" if math.isinf(claimed) else claimed,
        "epsilon_accounted": ledger.get("epsilon_achieved"),
        "delta": mech.delta,
        "sigma": ledger.get("sigma"),
        "lower_bound_within_claim": bool(result["epsilon_lower_bound"] <= claimed),
        **result,
        "mechanism": {
            "n": mech.n,
            "q": mech.q,
            "releases": mech.releases,
            "clip": mech.clip,
            "noise": mech.mechanism,
            "noise_scale_on_sum": mech.noise_scale,
            "divisor": mech.divisor,
            "neighbouring": mech.neighbouring,
        },
        "audited": (
            "the trainer's release sequence (Poisson sampling from SecretRandom, clipping, the ledger's "
            "noise via the method's release rule, the trainer's own) with a canary of clipped value +C at every release and "
            "a background contributing 0; the attacker sees every released scalar"
        ),
        **(
            {
                "selection": selection,
                "audited_selection": (
                    "the whole private selection: a random number of candidate runs of that release sequence "
                    "(the ledger's distribution), each scored by a noisy count of its releases that point the "
                    "canary's way, only the best run's transcript released"
                ),
            }
            if selection
            else {}
        ),
        "attack": "likelihood-ratio test on the released transcript (Neyman-Pearson optimal for this pair of worlds)",
        "trials": 2 * per_world,
        "noise_secure": bool(secret.is_secure),
        "seconds": round(time.perf_counter() - started, 2),
    }


def write_audit(
    ledger_path: str, path: str, *, trials: int, confidence: float, labels: dict[str, Any]
) -> dict[str, Any]:
    """Audit the cell whose ledger is at ``ledger_path`` and write its record (``labels`` first) to ``path``."""
    import json
    import logging
    from pathlib import Path

    from dpzo.fileio import write_json_atomic

    ledger = json.loads(Path(ledger_path).read_text())
    record = {**labels, **audit(ledger, trials=int(trials), confidence=float(confidence))}
    write_json_atomic(Path(path), record)
    log = logging.getLogger(__name__)
    log.info("audit: epsilon lower bound %.3f (claimed %s)", record["epsilon_lower_bound"], record["epsilon_claimed"])
    if not record["lower_bound_within_claim"]:
        # At 95% confidence this happens by chance in 1 audit in 20 at most; repeated, it is a bug.
        log.warning("the measured lower bound exceeds the claimed epsilon")
    return record


def plot_audit(audit_files: list[str], out_png: str):
    """The lower bound against the claimed epsilon, with y = x; sigma = 0 runs at the right edge.

    Audits run with the insecure test-only noise seed (``noise_secure`` false) are marked: the
    title gains ``TEST_NOISE_NOTICE`` (also the PNG's Title metadata) and their methods' legend
    entries a †.  Returns the (closed) figure."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpzo.fileio import atomic_path
    from dpzo.privacy.secret import TEST_NOISE_NOTICE

    records = [json.loads(Path(f).read_text()) for f in audit_files]
    test_noise = {r["method"] for r in records if not r.get("noise_secure", True)}
    finite = [float(r["epsilon_claimed"]) for r in records if r["epsilon_claimed"] != "inf"]
    top = max(finite, default=1.0)
    x_inf = 1.25 * top  # where the sigma = 0 (epsilon = inf) audits are drawn
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot([0, top], [0, top], linestyle="--", color="grey", label="y = x (claimed ε)")
    ceiling = max(r["largest_measurable_epsilon"] for r in records)
    ax.axhline(ceiling, linestyle=":", color="black", label=f"largest measurable with these trials ({ceiling:.1f})")
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        x = x_inf if r["epsilon_claimed"] == "inf" else float(r["epsilon_claimed"])
        groups.setdefault(r["method"], []).append((x, r["epsilon_lower_bound"]))
    for method, points in sorted(groups.items()):
        xs, ys = zip(*sorted(points))
        level = f"{100 * records[0]['confidence']:g}%"
        ax.plot(
            xs,
            ys,
            marker="o",
            linestyle="none",
            markersize=8,
            label=f"{method}{' †' if method in test_noise else ''}: ε lower bound ({level} confidence)",
        )
        for x, y in points:
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8)
    ticks = sorted(set(finite)) + [x_inf]
    ax.set_xticks(ticks, [f"{t:g}" for t in sorted(set(finite))] + ["∞\n(σ = 0)"])
    ax.set_xlim(0, x_inf * 1.12)
    ax.set_ylim(0, max(top, ceiling) * 1.1)
    ax.set_xlabel("claimed ε (δ as in the ledger)")
    ax.set_ylabel("empirical ε lower bound")
    cells = {" / ".join(str(r.get(k, "")) for k in ("model", "task")).strip(" /") for r in records}
    where = f"\n{cells.pop()}, {records[0]['trials']} runs per ε" if len(cells) == 1 and "" not in cells else ""
    notice = f"\n{TEST_NOISE_NOTICE}: the audits marked † ran on it" if test_noise else ""
    title = f"Privacy audit: measured lower bound vs claim{where}{notice}"
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    with atomic_path(Path(out_png)) as tmp:
        fig.savefig(tmp, dpi=120, format="png", metadata={"Title": title})
    plt.close(fig)
    return fig
