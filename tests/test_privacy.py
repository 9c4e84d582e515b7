"""Tests for dpzo.privacy and the ``dpzo calibrate`` CLI.

The accountants are checked against independent oracles, never against snapshots of our
own output:

* published calibration/epsilon values for n=1024, B=64 (q=1/16), Poisson sampling,
  add/remove neighbouring (columns computed with prv_accountant, dp_accounting PLD at
  discretization 1e-4 and dp_accounting RDP);
* the closed-form privacy profile of the (non-subsampled) Gaussian mechanism
  (Balle & Wang 2018), which all accountants must upper-bound;
* Opacus' RDP accountant, an independent implementation.

Runtime: ~30 s on 2 CPU cores (a handful of PLD/PRV calibrations, cached per session).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize, stats

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
try:  # run from a checkout without `pip install -e .`
    import dpzo  # noqa: F401
except ImportError:
    sys.path.insert(0, str(SRC))

from dpzo.cli import main as cli_main  # noqa: E402
from dpzo.privacy import accountants, calibration, mechanisms, records, secret  # noqa: E402

Q = 64 / 1024
D1024 = 1 / 1024

# (epsilon, steps, delta) -> published sigma for each accountant.
PUBLISHED_SIGMA = {
    (2.0, 6000, D1024): {"prv": 7.3622, "pld": 7.0587, "rdp": 7.8487},
    (4.0, 6000, D1024): {"prv": 4.1429, "pld": 4.0621, "rdp": 4.4531},
    (6.0, 6000, D1024): {"prv": 3.0285, "pld": 2.9910, "rdp": 3.2490},
    (2.0, 1000, D1024): {"prv": 3.0955, "pld": 2.9741, "rdp": 3.2989},
    (2.0, 10000, 1e-5): {"prv": 13.0845, "pld": 12.4969, "rdp": 13.4683},
}
CASES = list(PUBLISHED_SIGMA)
# Published epsilons at sigma = 4.143, q = 1/16, T = 6000, delta = 1/1024.
PUBLISHED_EPS_AT_4143 = {"prv": 3.9999, "pld": 3.8994, "rdp": 4.3820}
# Opacus get_noise_multiplier(target_epsilon=2, target_delta=1e-5, sample_rate=1/16, steps=10000).
OPACUS_SIGMA = 13.5156

EXACT_PLD = 1e-4  # discretization that the published PLD column used


@functools.cache
def calibrated(eps: float, steps: int, delta: float, accountant: str, disc: float = 1e-3) -> float:
    """Calibrations are the expensive part; share them between tests."""
    return calibration.calibrate_sigma(eps, delta, Q, steps, accountant, pld_discretization=disc)


def reference_accountant_sigma(case: tuple[float, int, float], accountant: str) -> float:
    """Our calibration in the configuration the published column used."""
    eps, steps, delta = case
    return calibrated(eps, steps, delta, accountant, EXACT_PLD if accountant == "pld" else 1e-3)


# --------------------------------------------------------------------------------------
# accountants against published values and independent oracles
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
@pytest.mark.parametrize("case", CASES, ids=[f"eps{e:g}-T{t}-delta{d:.3g}" for e, t, d in CASES])
def test_calibrated_sigma_matches_published(case, accountant):
    sigma = reference_accountant_sigma(case, accountant)
    assert sigma == pytest.approx(PUBLISHED_SIGMA[case][accountant], rel=1e-3)


@pytest.mark.parametrize("case", CASES, ids=[f"eps{e:g}-T{t}-delta{d:.3g}" for e, t, d in CASES])
def test_default_pld_discretization_is_pessimistic_and_close(case):
    eps, steps, delta = case
    coarse = calibrated(eps, steps, delta, "pld", 1e-3)
    exact = PUBLISHED_SIGMA[case]["pld"]
    # Coarser discretization is a looser (never tighter) bound: sigma can only grow.
    assert coarse >= exact - 5e-5  # published values are rounded to 4 decimals
    assert coarse <= exact * 1.005


@pytest.mark.parametrize("case", CASES, ids=[f"eps{e:g}-T{t}-delta{d:.3g}" for e, t, d in CASES])
def test_accountant_ordering(case):
    # PLD is the tightest bound; PRV's upper bound adds eps_error = 0.1; RDP is loosest.
    # (In this regime; for small targets PRV's fixed eps_error can exceed RDP's slack.)
    pld, prv, rdp = (reference_accountant_sigma(case, a) for a in ("pld", "prv", "rdp"))
    assert pld <= prv <= rdp


@pytest.mark.parametrize("accountant", ["pld", "prv", "rdp"])
def test_calibration_monotone_in_epsilon_and_steps(accountant):
    s = {case: reference_accountant_sigma(case, accountant) for case in CASES}
    # more budget -> less noise
    assert s[(2.0, 6000, D1024)] > s[(4.0, 6000, D1024)] > s[(6.0, 6000, D1024)]
    # more steps -> more noise
    assert s[(2.0, 1000, D1024)] < s[(2.0, 6000, D1024)]


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_calibration_monotone_in_delta(accountant):
    loose = calibrated(2.0, 1000, 1e-3, accountant)
    tight = calibrated(2.0, 1000, 1e-6, accountant)
    assert tight > loose


@pytest.mark.parametrize("accountant,disc", [("pld", EXACT_PLD), ("pld", 1e-3), ("prv", 1e-3), ("rdp", 1e-3)])
def test_calibrated_sigma_meets_target_and_is_nearly_smallest(accountant, disc):
    eps, steps, delta = 4.0, 6000, D1024
    sigma = calibrated(eps, steps, delta, accountant, disc)
    assert accountants.epsilon(sigma, Q, steps, delta, accountant, pld_discretization=disc) <= eps
    # 0.2% less noise must already violate the target (calibration is to ~1e-4).
    assert accountants.epsilon(sigma * 0.998, Q, steps, delta, accountant, pld_discretization=disc) > eps


def test_epsilon_at_fixed_sigma_matches_published():
    got = {
        "prv": accountants.epsilon(4.143, Q, 6000, D1024, "prv"),
        "pld": accountants.epsilon(4.143, Q, 6000, D1024, "pld", pld_discretization=EXACT_PLD),
        "rdp": accountants.epsilon(4.143, Q, 6000, D1024, "rdp"),
    }
    for name, ref in PUBLISHED_EPS_AT_4143.items():
        assert got[name] == pytest.approx(ref, abs=2e-4), name
    coarse = accountants.epsilon(4.143, Q, 6000, D1024, "pld", pld_discretization=1e-3)
    assert got["pld"] - 1e-9 <= coarse <= got["pld"] * 1.005


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon(delta) of a Gaussian mechanism with sensitivity/std ratio ``mu``.

    Balle & Wang (2018), Thm 8: delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu).
    T-fold composition of noise multiplier sigma is the case mu = sqrt(T)/sigma.
    """

    def delta_of(eps: float) -> float:
        return stats.norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu)

    return optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 100.0, xtol=1e-12)


@pytest.mark.parametrize("accountant,slack", [("pld", 2e-3), ("prv", 0.21), ("rdp", 0.5)])
def test_no_subsampling_upper_bounds_exact_gaussian(accountant, slack):
    """With q = 1 the composition is exactly Gaussian: an analytic oracle."""
    sigma, steps, delta = 20.0, 100, 1e-5
    exact = _exact_gaussian_epsilon(math.sqrt(steps) / sigma, delta)
    got = accountants.epsilon(sigma, 1.0, steps, delta, accountant, pld_discretization=EXACT_PLD)
    assert exact - 1e-9 <= got <= exact + slack


def test_rdp_agrees_with_opacus():
    pytest.importorskip("opacus")
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.utils import get_noise_multiplier

    ours = calibrated(2.0, 10000, 1e-5, "rdp")
    theirs = get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=Q, steps=10000, accountant="rdp")
    assert theirs == pytest.approx(OPACUS_SIGMA, rel=1e-4)
    # Opacus stops within epsilon_tolerance=0.01 of the target, i.e. at slightly more noise.
    assert ours <= theirs <= ours * 1.01
    alphas = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=Q, noise_multiplier=ours, steps=10000, orders=alphas)
    eps_opacus, _ = get_privacy_spent(orders=alphas, rdp=rdp, delta=1e-5)
    assert float(eps_opacus) == pytest.approx(2.0, abs=0.01)


def test_epsilon_monotone_in_sigma_and_compositions():
    for accountant in ("pld", "prv", "rdp"):
        eps = [accountants.epsilon(s, Q, 1000, D1024, accountant) for s in (2.0, 4.0, 8.0)]
        assert eps[0] > eps[1] > eps[2], accountant
        assert accountants.epsilon(4.0, Q, 2000, D1024, accountant) > eps[1], accountant


# --------------------------------------------------------------------------------------
# special values and input validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["pld", "prv", "rdp"])
def test_special_sigmas(accountant):
    assert accountants.epsilon(0.0, Q, 10, 1e-5, accountant) == math.inf
    assert accountants.epsilon(math.inf, Q, 10, 1e-5, accountant) == 0.0
    assert calibration.calibrate_sigma(math.inf, 1e-5, Q, 10, accountant) == 0.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=0.0), r"q .*0 < q <= 1"),
        (dict(q=1.5), r"q .*0 < q <= 1"),
        (dict(compositions=0), r"compositions must be an integer >= 1"),
        (dict(compositions=2.5), r"compositions must be an integer >= 1"),
        (dict(delta=0.0), r"delta must satisfy 0 < delta < 1"),
        (dict(delta=1.0), r"delta must satisfy 0 < delta < 1"),
        (dict(accountant="gdp"), r"accountant must be one of 'pld', 'prv', 'rdp'"),
        (dict(sigma=-1.0), r"sigma .*>= 0"),
        (dict(sigma=float("nan")), r"sigma .*>= 0"),
    ],
)
def test_epsilon_validates_inputs(kwargs, match):
    args = dict(sigma=1.0, q=Q, compositions=10, delta=1e-5, accountant="rdp") | kwargs
    with pytest.raises(ValueError, match=match):
        accountants.epsilon(**args)


def test_calibrate_validates_inputs_and_reports_unreachable():
    with pytest.raises(ValueError, match=r"epsilon .*>= 0"):
        calibration.calibrate_sigma(-1.0, 1e-5, Q, 10)
    with pytest.raises(ValueError, match=r"q .*0 < q <= 1"):
        calibration.calibrate_sigma(1.0, 1e-5, 0.0, 10)
    with pytest.raises(ValueError, match=r"unreachable.*noise multiplier above"):
        calibration.calibrate_sigma(1e-4, 1e-5, 1.0, 10**6, "pld")


def test_library_versions():
    versions = accountants.library_versions()
    assert set(versions) == {"dp-accounting", "prv-accountant", "numpy"}
    assert versions["numpy"] == np.__version__
    assert all(isinstance(v, str) and v for v in versions.values())


def test_import_is_light():
    """Importing dpzo.privacy must not pull in torch or the (slow) accounting libraries."""
    code = (
        "import sys, dpzo; before = set(sys.modules); import dpzo.privacy; "
        "new = set(sys.modules) - before; "
        "bad = sorted(m for m in new if m.split('.')[0] in {'torch', 'dp_accounting', 'prv_accountant', 'scipy'}); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------
# secret randomness
# --------------------------------------------------------------------------------------


def test_poisson_batch_inclusion_rate_and_shape():
    rng = secret.SecretRandom(insecure_test_seed=1)
    n, q, draws = 500, 0.1, 400
    counts = np.zeros(n, dtype=np.int64)
    for _ in range(draws):
        idx = rng.poisson_batch(n, q)
        assert idx.dtype == np.int64
        assert np.all(np.diff(idx) > 0)  # sorted, no duplicates
        assert idx.size == 0 or (0 <= idx[0] and idx[-1] < n)
        counts[idx] += 1
    total = int(counts.sum())
    assert stats.binomtest(total, n * draws, q).pvalue > 1e-4
    # every example has the same inclusion probability (chi-square over examples)
    expected = draws * q
    chi2 = float(((counts - expected) ** 2 / (expected * (1 - q))).sum())
    assert stats.chi2.sf(chi2, df=n) > 1e-4


def test_poisson_batch_allows_empty_batches():
    rng = secret.SecretRandom(insecure_test_seed=2)
    sizes = np.array([rng.poisson_batch(5, 0.1).size for _ in range(2000)])
    empty = int((sizes == 0).sum())
    assert stats.binomtest(empty, sizes.size, 0.9**5).pvalue > 1e-4  # P(empty) = 0.59
    assert rng.poisson_batch(100, 0.0).size == 0
    assert rng.poisson_batch(0, 0.5).size == 0
    np.testing.assert_array_equal(rng.poisson_batch(7, 1.0), np.arange(7))


def test_secure_instances_differ_and_test_seed_is_deterministic():
    a, b = secret.SecretRandom(), secret.SecretRandom()
    assert a.is_secure and b.is_secure
    assert [a.standard_normal() for _ in range(4)] != [b.standard_normal() for _ in range(4)]
    assert not np.array_equal(a.poisson_batch(1000, 0.5), b.poisson_batch(1000, 0.5))

    c, d = secret.SecretRandom(insecure_test_seed=7), secret.SecretRandom(insecure_test_seed=7)
    assert not c.is_secure
    assert [c.standard_normal() for _ in range(4)] == [d.standard_normal() for _ in range(4)]
    np.testing.assert_array_equal(c.poisson_batch(1000, 0.3), d.poisson_batch(1000, 0.3))


def test_secret_random_is_independent_of_global_generators():
    torch = pytest.importorskip("torch")
    import random

    def seed_globals():
        np.random.seed(1234)
        torch.manual_seed(1234)
        random.seed(1234)

    def global_state():
        return (np.random.get_state()[1].copy(), torch.get_rng_state().clone(), random.getstate())

    seed_globals()
    before = global_state()
    draws = []
    for _ in range(2):
        seed_globals()  # identical global seeds must not give identical secret noise
        r = secret.SecretRandom()
        draws.append(([r.standard_normal() for _ in range(3)], r.poisson_batch(200, 0.5)))
    (z1, b1), (z2, b2) = draws
    assert z1 != z2 and not np.array_equal(b1, b2)
    after = global_state()
    np.testing.assert_array_equal(before[0], after[0])
    assert torch.equal(before[1], after[1])
    assert before[2] == after[2]

    # and the global generators do not influence a (test-)seeded SecretRandom either
    np.random.seed(1)
    torch.manual_seed(1)
    x = secret.SecretRandom(insecure_test_seed=3).standard_normal()
    np.random.seed(2)
    torch.manual_seed(2)
    assert secret.SecretRandom(insecure_test_seed=3).standard_normal() == x


def test_the_package_never_seeds_the_noise_generator():
    """Outside privacy/secret.py, SecretRandom is only built by from_environment (OS seed, or the
    test-only variable), never with a seed argument that a config value could reach."""
    import re

    for path in sorted((SRC / "dpzo").rglob("*.py")):
        if path.name == "secret.py":
            continue
        text = path.read_text()
        assert "insecure_test_seed" not in text, path
        for call in re.findall(r"SecretRandom\(([^)]*)\)", text):
            assert call in ("", "..."), f"{path.name}: SecretRandom({call})"
    # and the one place that reads a seed takes it from the environment variable only
    source = (SRC / "dpzo" / "privacy" / "secret.py").read_text()
    assert source.count("insecure_test_seed=seed") == 1 and "os.environ.get(INSECURE_SEED_ENV" in source


def test_secret_random_cannot_be_copied_and_hides_state():
    r = secret.SecretRandom()
    for clone in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="must not be pickled or copied"):
            clone(r)
    assert repr(r) == "SecretRandom(is_secure=True)"
    with pytest.raises(AttributeError):
        r.is_secure = False  # read-only


def test_from_environment(monkeypatch):
    monkeypatch.delenv(secret.INSECURE_SEED_ENV, raising=False)
    assert secret.INSECURE_SEED_ENV == "DPZO_INSECURE_TEST_NOISE_SEED"
    assert secret.SecretRandom.from_environment().is_secure
    assert secret.from_environment().is_secure

    monkeypatch.setenv(secret.INSECURE_SEED_ENV, "42")
    with pytest.warns(RuntimeWarning, match="NO privacy"):
        r = secret.SecretRandom.from_environment()
    assert not r.is_secure
    assert r.standard_normal() == secret.SecretRandom(insecure_test_seed=42).standard_normal()

    monkeypatch.setenv(secret.INSECURE_SEED_ENV, "not-a-number")
    with pytest.raises(ValueError, match=secret.INSECURE_SEED_ENV):
        secret.from_environment()


def test_privatize_sum():
    rng, ref = secret.SecretRandom(insecure_test_seed=5), secret.SecretRandom(insecure_test_seed=5)
    # sigma = 0: plain normalised sum and no draw (the stream is not advanced)
    assert mechanisms.privatize_sum(3.0, 0.0, 1.0, 6.0, rng) == 0.5
    z = ref.standard_normal()
    assert mechanisms.privatize_sum(3.0, 2.0, 0.5, 6.0, rng) == pytest.approx((3.0 + 2.0 * 0.5 * z) / 6.0)
    # noise distribution: N(0, (sigma C / B)^2)
    secure = secret.SecretRandom()
    xs = np.array([mechanisms.privatize_sum(0.0, 3.0, 2.0, 4.0, secure) for _ in range(20000)])
    assert abs(xs.mean()) < 5 * 1.5 / math.sqrt(xs.size)
    assert xs.std() == pytest.approx(1.5, rel=0.03)
    with pytest.raises(ValueError, match="clip"):
        mechanisms.privatize_sum(0.0, 1.0, 0.0, 4.0, secure)


# --------------------------------------------------------------------------------------
# accounting record
# --------------------------------------------------------------------------------------

RECORD_KEYS = {
    "private",
    "epsilon_target",
    "delta",
    "sigma",
    "noise_multiplier",
    "q",
    "n",
    "expected_batch_size",
    "steps",
    "directions",
    "compositions",
    "clip",
    "sampler",
    "neighbouring",
    "sensitivity",
    "calibrated_with",
    "pld_discretization",
    "epsilon_achieved",
    "library_versions",
}


def test_accounting_record_private():
    rec = records.accounting_record(
        n=1024, batch_size=64, steps=500, directions=2, clip=0.5, epsilon_target=2.0, delta=D1024, accountant="pld"
    )
    assert RECORD_KEYS <= set(rec)
    json.dumps(rec, allow_nan=False)  # strict JSON
    assert rec["private"] is True
    assert rec["q"] == Q and rec["compositions"] == 1000 and rec["expected_batch_size"] == 64
    assert rec["sensitivity"] == rec["clip"] == 0.5
    assert rec["sampler"] == "poisson" and rec["neighbouring"] == "add/remove one example"
    assert rec["sigma"] == rec["noise_multiplier"]
    # T=500 steps x P=2 directions is accounted like 1000 single-direction releases
    assert rec["sigma"] == pytest.approx(PUBLISHED_SIGMA[(2.0, 1000, D1024)]["pld"], rel=5e-3)
    achieved = rec["epsilon_achieved"]
    assert achieved["pld"] <= 2.0 < achieved["prv"] < achieved["rdp"]
    assert rec["calibrated_with"] == "pld"
    assert rec["library_versions"] == accountants.library_versions()


def test_accounting_record_non_private_and_given_sigma():
    rec = records.accounting_record(
        n=100, batch_size=10, steps=5, directions=1, clip=1.0, epsilon_target=math.inf, delta=1e-5, accountant="pld"
    )
    json.dumps(rec, allow_nan=False)
    assert rec["private"] is False and rec["sigma"] == 0.0
    assert rec["epsilon_target"] == "inf"
    assert rec["epsilon_achieved"] == {"pld": "inf", "prv": "inf", "rdp": "inf"}

    rec = records.accounting_record(
        n=1024,
        batch_size=64,
        steps=6000,
        directions=1,
        clip=1.0,
        epsilon_target=4.0,
        delta=D1024,
        accountant="rdp",
        sigma=4.143,
    )
    assert rec["sigma"] == 4.143 and rec["calibrated_with"] is None
    assert rec["epsilon_achieved"]["rdp"] == pytest.approx(PUBLISHED_EPS_AT_4143["rdp"], abs=2e-4)


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(batch_size=200), r"batch_size must satisfy 1 <= batch_size <= n"), (dict(n=0), r"n .*>= 1")],
)
def test_accounting_record_rejects_bad_sizes(kwargs, match):
    args = (
        dict(n=100, batch_size=10, steps=5, directions=1, clip=1.0, epsilon_target=1.0, delta=1e-5, accountant="rdp")
        | kwargs
    )
    with pytest.raises(ValueError, match=match):
        records.accounting_record(**args)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH", "")) if p)
    return env


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dpzo", *args], env=_env(), capture_output=True, text=True, timeout=120
    )


def test_cli_calibrate_prints_one_json_object():
    proc = _run_cli(
        "calibrate", "--n", "1024", "--batch-size", "64", "--steps", "1000", "--epsilon", "2", "--delta", str(D1024)
    )
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert RECORD_KEYS <= set(rec)
    assert rec["calibrated_with"] == "pld"
    assert rec["sigma"] == pytest.approx(PUBLISHED_SIGMA[(2.0, 1000, D1024)]["pld"], rel=5e-3)


def test_cli_bad_input_exit_code_2():
    proc = _run_cli(
        "calibrate", "--n", "1024", "--batch-size", "2000", "--steps", "10", "--epsilon", "2", "--delta", "1e-5"
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "--batch-size" in proc.stderr and "--n" in proc.stderr


BASE = [
    "calibrate",
    "--n",
    "1024",
    "--batch-size",
    "64",
    "--steps",
    "1000",
    "--epsilon",
    "2",
    "--delta",
    "1e-5",
    "--accountant",
    "rdp",
]


def _with(flag: str, value: str | None) -> list[str]:
    """BASE with ``flag`` replaced by ``value`` (or dropped when value is None)."""
    args = list(BASE)
    i = args.index(flag)
    del args[i : i + 2]
    return args if value is None else args + [flag, value]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (_with("--delta", "1.5"), "--delta"),
        (_with("--delta", "0"), "--delta"),
        (_with("--epsilon", "-1"), "--epsilon"),
        (_with("--epsilon", "nan"), "--epsilon"),
        (_with("--n", "0"), "--n"),
        (_with("--steps", None), "--steps"),
        (_with("--accountant", "gdp"), "--accountant"),
        (_with("--batch-size", "4096"), "--batch-size"),
        (
            [
                "calibrate",
                "--n",
                "10",
                "--batch-size",
                "10",
                "--steps",
                "1000000",
                "--epsilon",
                "0.0001",
                "--delta",
                "1e-5",
                "--accountant",
                "rdp",
            ],
            "unreachable",
        ),
    ],
)
def test_cli_bad_input_in_process(argv, needle, capsys):
    assert cli_main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert needle in err


def test_cli_in_process_success(capsys):
    assert cli_main(BASE) == 0
    out, _ = capsys.readouterr()
    rec = json.loads(out)
    assert rec["calibrated_with"] == "rdp"
    assert rec["epsilon_achieved"]["rdp"] <= 2.0


# ---------------------------------------------------------------------------------------------
# DPZero's published accounting and the pure-DP Laplace mechanism (closed forms)
# ---------------------------------------------------------------------------------------------


def test_dpzero_published_sigma_matches_opacus_value():
    rec = records.dpzero_published_record(n=1024, batch_size=64, steps=10000, clip=200.0, epsilon_target=2.0)
    assert rec["sigma"] == pytest.approx(13.5156, abs=1e-4)  # published get_noise_multiplier value
    assert rec["noise_std_on_sum"] == pytest.approx(2 * rec["sigma"] * 200.0)  # replace-one: 2 sigma C
    assert rec["neighbouring"].startswith("replace")
    # the same noise under add/remove with sensitivity C is a multiplier 2 sigma: a smaller epsilon
    assert rec["epsilon_add_remove"]["pld"] < 2.0


def test_laplace_amplification_and_composition_closed_forms():
    q, T, eps = 1 / 16, 300, 8.0
    eps_step, eps0 = calibration.laplace_step_epsilon(eps, q, T)
    assert eps_step == pytest.approx(eps / T)
    # amplification by Poisson subsampling: log(1 + q (e^eps0 - 1)) == eps_step
    assert math.log(1 + q * (math.exp(eps0) - 1)) == pytest.approx(eps_step, rel=1e-12)
    assert accountants.laplace_epsilon(eps0, q, T) == pytest.approx(eps, rel=1e-12)
    assert calibration.laplace_step_epsilon(eps, 1.0, T)[1] == pytest.approx(eps / T)  # q = 1: no amplification
    rec = records.laplace_record(n=1024, batch_size=64, steps=T, directions=1, clip=0.05, epsilon_target=eps)
    assert rec["mechanism"] == "laplace" and rec["delta"] == 0.0
    assert rec["laplace_scale_on_sum"] == pytest.approx(0.05 / eps0)  # b = sensitivity / eps0
    noise = mechanisms.NoisySum.from_ledger(rec)
    assert noise.mechanism == "laplace" and noise.scale == rec["laplace_scale_on_sum"]


def test_laplace_draws_have_the_laplace_variance():
    rng = secret.SecretRandom(insecure_test_seed=0)
    xs = np.array([rng.standard_laplace() for _ in range(40000)])
    assert abs(xs.mean()) < 0.03 and xs.var() == pytest.approx(2.0, rel=0.05)
    assert np.mean(np.abs(xs)) == pytest.approx(1.0, rel=0.03)  # E|X| = b


def test_a_cross_check_that_cannot_be_evaluated_is_recorded_not_fatal():
    # PRV's discretisation fails at this small sigma; PLD (the calibrating accountant) holds.
    rec = records.accounting_record(n=32, batch_size=4, steps=2, clip=1.0, epsilon_target=8.0, delta=1e-5)
    assert rec["epsilon_achieved"]["pld"] <= 8.0
    assert str(rec["epsilon_achieved"]["prv"]).startswith("not computed")
    assert isinstance(rec["epsilon_achieved"]["rdp"], float)


@pytest.mark.parametrize("method", ["dp-zo-laplace", "dp-zo-laplace+c0.1", "dpzero", "dpzero+c50"])
def test_a_method_variant_is_accounted_like_its_method(method):
    """`<method>+<variant>` names a hyperparameter variant; its mechanism and accounting are the method's."""
    common = dict(
        n=512,
        batch_size=32,
        steps=20,
        directions=1,
        clip=1.0,
        epsilon_target=4.0,
        delta=1e-5,
        accountant="rdp",
        convention="published",
    )
    rec = records.method_ledger(method, **common)
    plain = records.method_ledger(method.split("+")[0], **common)
    assert rec["method"] == method
    assert {k: v for k, v in rec.items() if k not in ("method", "versions")} == {
        k: v for k, v in plain.items() if k not in ("method", "versions")
    }
    if method.startswith("dp-zo-laplace"):
        assert rec.get("sigma") is None and rec["epsilon_achieved"]["pure"] <= 4.0 * (1 + 1e-12)
    else:
        assert rec["neighbouring"] == plain["neighbouring"] and "replace" in rec["neighbouring"]


def test_calibration_cache_returns_exactly_what_it_computed(tmp_path, monkeypatch):
    """A grid's cells share calibrations: the cached ledger equals a fresh one bit for bit, a
    repeat is served from the cache, and anything else in the key computes anew."""
    cell = dict(n=256, batch_size=16, steps=50, clip=2.0, epsilon_target=3.0, delta=1e-5)
    fresh = records.accounting_record(**cell)
    first = records.accounting_record(**cell, cache_dir=tmp_path)
    assert first == fresh and len(list(tmp_path.glob("*.json"))) == 1

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(records, "calibrate_sigma", no_calibration)
    assert records.accounting_record(**dict(cell, clip=5.0), cache_dir=tmp_path) == dict(
        fresh, clip=5.0, sensitivity=5.0, noise_std_on_sum=fresh["sigma"] * 5.0
    )  # sigma does not depend on C
    for other in (dict(epsilon_target=2.5), dict(steps=51), dict(delta=2e-5), dict(batch_size=17)):
        with pytest.raises(AssertionError, match="calibrated again"):
            records.accounting_record(**dict(cell, **other), cache_dir=tmp_path)


def test_calibration_cache_ignores_an_entry_stored_for_another_key(tmp_path):
    cell = dict(n=256, batch_size=16, steps=50, clip=2.0, epsilon_target=3.0, delta=1e-5)
    fresh = records.accounting_record(**cell, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.json")
    stored = json.loads(entry.read_text())
    entry.write_text(json.dumps({"key": dict(stored["key"], q=0.5), "value": {"sigma": 0.01, "epsilon_achieved": {}}}))
    assert records.accounting_record(**cell, cache_dir=tmp_path) == fresh
    assert json.loads(entry.read_text()) == stored  # rewritten with the right key
