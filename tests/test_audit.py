"""The empirical privacy audit against closed forms, scipy, and the trainer's own releases."""

from __future__ import annotations

import copy
import functools
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from dpzo.cli import main as cli_main
from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.privacy import audit as A
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.records import accounting_record, method_ledger
from dpzo.privacy.secret import SecretRandom
from dpzo.zo.flat import direction_seed, gaussian_direction
from dpzo.zo.loop import train_zo


@functools.cache
def _ledger(method, n, batch_size, steps, directions, clip, eps, delta, convention):
    return method_ledger(
        method,
        n=n,
        batch_size=batch_size,
        steps=steps,
        directions=directions,
        clip=clip,
        epsilon_target=eps,
        delta=delta,
        convention=convention,
    )


def ledger(
    method="dp-zoso", *, n=16, batch_size=8, steps=3, directions=1, clip=1.0, eps=8.0, delta=1e-5, convention="common"
):
    """A cell's ledger as the account rule writes it (cached: calibration takes a moment)."""
    return copy.deepcopy(_ledger(method, n, batch_size, steps, directions, clip, eps, delta, convention))


@functools.cache
def _given_sigma(sigma, n, batch_size, steps, directions, clip, delta):
    rec = accounting_record(
        n=n,
        batch_size=batch_size,
        steps=steps,
        directions=directions,
        clip=clip,
        epsilon_target=math.inf,
        delta=delta,
        sigma=sigma,
    )
    return rec | {"method": "dp-zoso"}


def given_sigma(sigma, *, n=1, batch_size=1, steps=1, directions=1, clip=1.0, delta=1e-5):
    """A dp-zoso ledger with a fixed noise multiplier (no calibration: fast)."""
    return copy.deepcopy(_given_sigma(sigma, n, batch_size, steps, directions, clip, delta))


# ---------------------------------------------------------------------------------------------
# the statistics: Clopper-Pearson and the bound
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 7, 50, 99, 100])
def test_clopper_pearson_matches_scipy_exact_interval(k):
    n, alpha = 100, 0.025
    lower, upper = A.clopper_pearson(k, n, alpha)
    # a two-sided exact interval at level 1 - 2 alpha has one-sided alpha bounds at its ends
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact")
    assert float(lower) == pytest.approx(ci.low, abs=1e-12)
    assert float(upper) == pytest.approx(ci.high, abs=1e-12)


def test_clopper_pearson_closed_forms_at_the_ends():
    n, alpha = 250, 0.025
    lower, upper = A.clopper_pearson(np.array([0, n]), n, alpha)
    assert upper[0] == pytest.approx(1 - alpha ** (1 / n), rel=1e-10)  # no success: 1 - alpha^(1/n)
    assert lower[1] == pytest.approx(alpha ** (1 / n), rel=1e-10)  # all successes: alpha^(1/n)
    assert lower[0] == 0.0 and upper[1] == 1.0


def test_separated_scores_reach_exactly_the_largest_measurable_epsilon():
    n, delta = 400, 1e-5
    bound = A.epsilon_lower_bound(np.ones(n), np.zeros(n), delta=delta, confidence=0.95)
    half, m = 0.025, 300  # a quarter of the runs chooses the threshold, 300 per world measure it
    expected = math.log((half ** (1 / m) - delta) / (1 - half ** (1 / m)))
    assert bound["epsilon_lower_bound"] == pytest.approx(expected, rel=1e-9)
    assert bound["largest_measurable_epsilon"] == pytest.approx(expected, rel=1e-9)
    assert bound["epsilon_point_estimate"] == "inf" and bound["evaluation_runs_per_world"] == [m, m]


def test_indistinguishable_scores_give_no_bound():
    rng = np.random.default_rng(0)
    bound = A.epsilon_lower_bound(rng.normal(size=2000), rng.normal(size=2000), delta=1e-5)
    assert bound["epsilon_lower_bound"] < 0.2  # same distribution: only chance in the calibration half


def test_the_bound_is_measured_on_runs_the_threshold_never_saw():
    """Scores separated only in the calibration half carry no evidence in the evaluation half."""
    n = 400
    scores_in = np.concatenate([np.ones(n // 4), np.zeros(n - n // 4)])
    scores_out = np.zeros(n)
    assert A.epsilon_lower_bound(scores_in, scores_out, delta=1e-5)["epsilon_lower_bound"] == 0.0


# ---------------------------------------------------------------------------------------------
# the mechanism and the attack
# ---------------------------------------------------------------------------------------------


def test_mechanism_is_the_trainers_release_sequence_bit_for_bit():
    """train_zo on a model with a Dirac canary releases exactly what run_mechanism releases."""
    n, steps, directions, clip, slope = 12, 7, 2, 2.0, 1e12

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))

    model = Linear()

    def per_example_loss(index):
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        # the canary (example 0): a huge slope along coordinate 0; every other loss is constant
        return torch.where(index == 0, slope * model.theta[0], torch.zeros((), dtype=torch.float64))

    hp = ZOHyperparameters(steps=steps, batch_size=6, lr=1e-3, clip=clip, directions=directions)
    rec = given_sigma(1.3, n=n, batch_size=6, steps=steps, directions=directions, clip=clip)
    history = train_zo(
        model,
        per_example_loss,
        n,
        hp,
        method="dp-zoso",
        run_seed=3,
        noise=NoisySum.from_ledger(rec),
        secret=SecretRandom(insecure_test_seed=11),
        master_dtype=torch.float64,
        record_releases=True,
    )
    # the auditor knows the canary's clipped value at every release from the public directions
    z0 = np.array(
        [
            float(gaussian_direction(direction_seed(3, t, p), 5, dtype=torch.float64)[0])
            for t in range(steps)
            for p in range(directions)
        ]
    )
    assert np.abs(z0).min() > 1e-6  # |slope * z| >> C: the clip sets the canary to exactly +-C
    mech = A.AuditedMechanism.from_ledger(rec)
    audited = A.run_mechanism(mech, True, SecretRandom(insecure_test_seed=11), np.sign(z0) * A.CANARY_SCALE * clip)
    assert history["released"] == audited.tolist()
    assert len(audited) == rec["compositions"] == steps * directions


def test_raw_difference_clipping_releases_the_same_sum_up_to_the_public_two_beta():
    """Tang et al.'s release divides by the public 2 beta; the audit undoes it (beta = 1/2)."""
    n, steps, clip, beta = 8, 5, 0.05, 1e-2

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    model = One()

    def loss(index):
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return torch.where(index == 0, 1e9 * model.theta[0], torch.zeros((), dtype=torch.float64))

    rec = ledger("dp-zo-laplace", n=n, batch_size=4, steps=steps, clip=clip, eps=8.0)
    hp = ZOHyperparameters(steps=steps, batch_size=4, lr=1e-3, beta_start=beta, beta_end=beta, clip=clip)
    history = train_zo(
        model,
        loss,
        n,
        hp,
        method="dp-zo-laplace",
        run_seed=1,
        noise=NoisySum.from_ledger(rec),
        secret=SecretRandom(insecure_test_seed=2),
        master_dtype=torch.float64,
        record_releases=True,
    )
    signs = np.sign(
        [float(gaussian_direction(direction_seed(1, t, 0), 1, dtype=torch.float64)[0]) for t in range(steps)]
    )
    mech = A.AuditedMechanism.from_ledger(rec)
    assert mech.mechanism == "laplace" and mech.delta == 0.0
    audited = A.run_mechanism(mech, True, SecretRandom(insecure_test_seed=2), signs * A.CANARY_SCALE * clip)
    np.testing.assert_allclose(np.array(history["released"]) * 2 * beta, audited, rtol=1e-12, atol=0)


def test_one_gaussian_release_has_the_calibrated_distribution_and_closed_form_rates():
    """q = 1, one release: x ~ N(1, s^2) with the canary, N(0, s^2) without (s = sigma)."""
    sigma, runs = 0.8, 3000
    mech = A.AuditedMechanism.from_ledger(given_sigma(sigma, clip=3.0))
    secret = SecretRandom(insecure_test_seed=4)
    x_in = np.array([A.run_mechanism(mech, True, secret)[0] for _ in range(runs)]) * mech.divisor / mech.clip
    x_out = np.array([A.run_mechanism(mech, False, secret)[0] for _ in range(runs)]) * mech.divisor / mech.clip
    assert stats.kstest(x_in, stats.norm(1.0, sigma).cdf).pvalue > 1e-3
    assert stats.kstest(x_out, stats.norm(0.0, sigma).cdf).pvalue > 1e-3
    # the likelihood ratio of one Gaussian release is (2x - 1) / (2 sigma^2): monotone in x
    scores_in = A.likelihood_ratio_scores(x_in[:, None] * mech.clip / mech.divisor, mech)
    np.testing.assert_allclose(scores_in, (2 * x_in - 1) / (2 * sigma**2), rtol=1e-9)
    scores_out = A.likelihood_ratio_scores(x_out[:, None] * mech.clip / mech.divisor, mech)
    bound = A.epsilon_lower_bound(scores_in, scores_out, delta=mech.delta)
    x_tau = bound["threshold"] * sigma**2 + 0.5  # the threshold back in units of C
    if bound["direction"] == "in-world scores high":  # event x >= x_tau, favouring the in-world
        tpr, fpr = stats.norm.sf((x_tau - 1) / sigma), stats.norm.sf(x_tau / sigma)
    else:  # event x < x_tau, favouring the out-world (the two are symmetric here)
        tpr, fpr = stats.norm.cdf(x_tau / sigma), stats.norm.cdf((x_tau - 1) / sigma)
    m = runs - runs // 4  # the evaluation runs
    assert abs(bound["rate_of_event_in_the_world_it_favours"] - tpr) < 5 * math.sqrt(tpr * (1 - tpr) / m) + 1 / m
    assert abs(bound["rate_of_event_in_the_other_world"] - fpr) < 5 * math.sqrt(fpr * (1 - fpr) / m) + 1 / m


def test_likelihood_ratio_matches_the_mixture_densities_in_float64():
    rng = np.random.default_rng(1)
    mech = A.AuditedMechanism.from_ledger(given_sigma(0.9, n=20, batch_size=5, steps=4, clip=2.0))
    released = rng.normal(size=(6, 4))
    x = released * mech.divisor / mech.clip
    q, s = mech.q, 0.9
    density_in = (1 - q) * stats.norm.pdf(x, 0, s) + q * stats.norm.pdf(x, 1, s)
    expected = np.log(density_in / stats.norm.pdf(x, 0, s)).sum(axis=1)
    np.testing.assert_allclose(A.likelihood_ratio_scores(released, mech), expected, rtol=1e-10)
    # replace-one: the out-world holds an example of value -C instead of nothing
    swapped = A.AuditedMechanism(**{**mech.__dict__, "neighbouring": "replace-one"})
    density_out = (1 - q) * stats.norm.pdf(x, 0, s) + q * stats.norm.pdf(x, -1, s)
    np.testing.assert_allclose(
        A.likelihood_ratio_scores(released, swapped), np.log(density_in / density_out).sum(axis=1), rtol=1e-10
    )


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_replace_one_ledger_swaps_the_canary_for_its_opposite():
    rec = ledger("dpzero", n=16, batch_size=8, steps=4, clip=1.5, eps=6.0, convention="published")
    mech = A.AuditedMechanism.from_ledger(rec)
    assert mech.neighbouring == "replace-one" and mech.noise_scale == pytest.approx(2 * rec["sigma"] * 1.5)
    silent = A.AuditedMechanism(**{**mech.__dict__, "noise_scale": 0.0})
    secret = SecretRandom(insecure_test_seed=3)
    out = np.concatenate([A.run_mechanism(silent, False, secret) for _ in range(50)]) * silent.divisor / silent.clip
    assert set(np.unique(out)) == {-1.0, 0.0}  # the swapped example: -C whenever sampled


def test_no_noise_audit_has_power_up_to_the_ceiling():
    rec = ledger(n=8, batch_size=4, steps=40, eps=math.inf)  # sigma = 0; P(canary never sampled) = 2^-40
    assert rec["private"] is False
    result = A.audit(rec, trials=400, secret=SecretRandom(insecure_test_seed=5))
    assert result["epsilon_lower_bound"] == pytest.approx(A.largest_measurable_epsilon(150, 0.95, 1e-5), rel=1e-9)
    assert result["epsilon_lower_bound"] > 3.0 and result["epsilon_claimed"] == "inf"


@pytest.mark.parametrize("eps", [2.0, 8.0])
def test_private_audit_stays_within_the_claim(eps):
    rec = ledger(eps=eps)  # calibrated by the project's accountant, as the account rule does
    result = A.audit(rec, trials=3000, secret=SecretRandom(insecure_test_seed=6))
    assert 0.0 <= result["epsilon_lower_bound"] <= eps and result["lower_bound_within_claim"]
    if eps == 8.0:
        assert result["epsilon_lower_bound"] > 1.0  # and the attack has power against small noise
    json.dumps(result, allow_nan=False)  # a strict JSON record


def test_audit_draws_its_noise_from_the_secret_generator():
    rec = given_sigma(1.0, n=16, batch_size=8, steps=3)
    a = A.audit(rec, trials=64, secret=SecretRandom())
    b = A.audit(rec, trials=64, secret=SecretRandom())
    assert a["noise_secure"] and a["threshold"] != b["threshold"]  # fresh OS seeds: different noise
    c = A.audit(rec, trials=64, secret=SecretRandom(insecure_test_seed=1))
    d = A.audit(rec, trials=64, secret=SecretRandom(insecure_test_seed=1))
    assert not c["noise_secure"] and c["threshold"] == d["threshold"]


@pytest.mark.parametrize(
    "bad,needle",
    [
        (ledger("mezo", eps=math.inf), "private zeroth-order"),
        ({**given_sigma(1.0), "method": "dp-sgd"}, "private zeroth-order"),
        ({k: v for k, v in given_sigma(1.0).items() if k != "compositions"}, "lacks ['compositions']"),
        ({**given_sigma(1.0), "n": "many"}, "malformed"),
        ({**ledger(eps=math.inf), "clip": "inf"}, "clip must be finite"),
        ([1, 2], "JSON object"),
    ],
)
def test_unauditable_ledgers_are_refused_with_the_reason(bad, needle):
    with pytest.raises(A.AuditError) as err:
        A.audit(bad, trials=64)
    assert needle in str(err.value)


def test_too_few_trials_are_refused():
    with pytest.raises(A.AuditError, match="at least 16"):
        A.audit(given_sigma(1.0), trials=10)


# ---------------------------------------------------------------------------------------------
# dpzo audit
# ---------------------------------------------------------------------------------------------


def test_cli_audit_prints_the_record_and_writes_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DPZO_INSECURE_TEST_NOISE_SEED", "3")
    out = tmp_path / "audit.json"
    argv = [
        "audit",
        "--n",
        "16",
        "--batch-size",
        "8",
        "--steps",
        "3",
        "--epsilon",
        "8",
        "--delta",
        "1e-5",
        "--trials",
        "200",
        "--out",
        str(out),
    ]
    with pytest.warns(RuntimeWarning, match="NO privacy"):
        assert cli_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["epsilon_claimed"] == 8.0 and 0 <= printed["epsilon_lower_bound"] <= 8.0
    # the same audit from a ledger file
    led = tmp_path / "privacy.json"
    led.write_text(json.dumps(ledger(eps=8.0)))  # the ledger the CLI calibrated above
    with pytest.warns(RuntimeWarning):
        assert cli_main(["audit", "--ledger", str(led), "--trials", "200"]) == 0
    assert json.loads(capsys.readouterr().out)["epsilon_lower_bound"] == printed["epsilon_lower_bound"]


def _bad_ledger_files(tmp_path):
    (tmp_path / "latin1.json").write_bytes('{"method": "dp-zoso é"}'.encode("latin-1"))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "mezo.json").write_text(json.dumps(ledger("mezo", eps=math.inf)))


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--ledger", "{tmp}/absent.json"], "not found"),
        (["--ledger", "{tmp}/broken.json"], "not a JSON ledger"),
        (["--ledger", "{tmp}/latin1.json"], "not a JSON ledger"),
        (["--ledger", "{tmp}/mezo.json"], "private zeroth-order"),
        (["--ledger", "{tmp}/mezo.json", "--n", "10"], "not allowed with --n"),
        (["--n", "16", "--batch-size", "8", "--epsilon", "2", "--delta", "1e-5"], "--steps"),
        (["--n", "8", "--batch-size", "16", "--steps", "3", "--epsilon", "2", "--delta", "1e-5"], "--batch-size"),
        (
            ["--n", "16", "--batch-size", "8", "--steps", "3", "--epsilon", "2", "--delta", "1e-5", "--trials", "3"],
            "--trials",
        ),
        (
            [
                "--n",
                "16",
                "--batch-size",
                "8",
                "--steps",
                "3",
                "--epsilon",
                "2",
                "--delta",
                "1e-5",
                "--confidence",
                "1.5",
            ],
            "--confidence",
        ),
        (["--n", "16", "--batch-size", "8", "--steps", "3", "--epsilon", "-2", "--delta", "1e-5"], "--epsilon"),
    ],
)
def test_cli_audit_bad_arguments_exit_2_and_write_nothing(argv, needle, tmp_path, capsys):
    _bad_ledger_files(tmp_path)
    out = tmp_path / "audit.json"
    argv = ["audit", *[a.format(tmp=tmp_path) for a in argv], "--out", str(out)]
    assert cli_main(argv) == 2
    printed, err = capsys.readouterr()
    assert printed == "" and "dpzo audit: error" in err and needle in err
    assert not out.exists()


def _selection_ledger(sigma: float | None = None) -> dict:
    """A privately tuned cell's ledger on the toy problem (10 steps, E[K] = 3, claimed ε = 2)."""
    from dpzo.methods import hyperparameters_for
    from dpzo.pipeline.tuning import TuneSettings
    from dpzo.privacy.ledger import AccountingSettings, Cell
    from dpzo.privacy.selection_ledger import selection_ledger

    tune = TuneSettings(mode="private", grid={"lr": [1e-4, 1e-3]}, mean=3.0)
    hp = hyperparameters_for("dp-zoso", {"steps": 10, "batch_size": 16, "lr": 1e-4, "clip": 1.0})
    ledger = selection_ledger(
        Cell("m", "t", "dp-zoso+tuned", "2", 13),
        hp,
        n_total=80,
        n_validation=16,
        selection=tune.as_dict(),
        settings=AccountingSettings(delta=1e-5),
    )
    if sigma is not None:  # an edited ledger: far less noise than its claim needs
        ledger.update(sigma=sigma, noise_std_on_sum=sigma * hp.clip, score_sigma=2.0 * sigma)
    return ledger


def test_the_audit_of_a_private_selection_stays_below_its_claim_and_catches_a_false_one():
    """End to end on the toy problem: a random number of candidate runs, each scored, only the
    best released; the bound of an honest selection is within its ε, and a ledger claiming ε = 2
    with a twentieth of the noise is caught."""
    honest = A.audit(_selection_ledger(), trials=1000, secret=SecretRandom(insecure_test_seed=3))
    assert honest["selection"]["mean"] == 3.0 and "audited_selection" in honest
    assert honest["lower_bound_within_claim"] and honest["epsilon_lower_bound"] <= 2.0
    false = A.audit(_selection_ledger(sigma=0.05), trials=1000, secret=SecretRandom(insecure_test_seed=3))
    assert false["epsilon_lower_bound"] > 2.0 and not false["lower_bound_within_claim"]
