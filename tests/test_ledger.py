"""The trainer's check of a cell's ledger: it must be this cell's, and its noise must certify the
cell's ε (recomputed with the accountant, not read from the file)."""

from __future__ import annotations

import functools
import json
import math

import pytest

from dpzo.fileio import CorruptOutput, read_json_output
from dpzo.methods import hyperparameters_for
from dpzo.privacy import accountants, records
from dpzo.privacy.ledger import AccountingSettings, Cell, LedgerMismatch, cell_ledger, check_counts, verify_ledger

# sigma well above 1 keeps every PLD evaluation well under a second (small sigma is slow)
N = 64
ZOSO = {"steps": 40, "batch_size": 8, "lr": 1e-3, "clip": 2.0}
SETTINGS = AccountingSettings(delta=1e-5, accountant="pld", convention="common", noise="secure")


def cell(method="dp-zoso", eps="4", **kw) -> Cell:
    return Cell(**({"model": "m", "task": "demo-sst2", "method": method, "eps": eps, "seed": 13} | kw))


def ledger_for(c: Cell, params=ZOSO, settings=SETTINGS) -> dict:
    return json.loads(_ledger(c, json.dumps(params, sort_keys=True), settings))


@functools.cache
def _ledger(c: Cell, params: str, settings: AccountingSettings) -> str:
    """Each distinct ledger is calibrated once per session (a copy is returned: tests edit them)."""
    return json.dumps(cell_ledger(c, hyperparameters_for(c.method, json.loads(params)), n=N, settings=settings))


def verify(ledger, c: Cell, params=ZOSO, settings=SETTINGS, n=N):
    return verify_ledger(
        ledger,
        cell=c,
        hp=hyperparameters_for(c.method, dict(params)),
        n=n,
        settings=settings,
        path="results/runs/x/privacy.json",
    )


@pytest.fixture
def own():
    return ledger_for(cell())


def refused(ledger, c: Cell, field: str, **kw) -> LedgerMismatch:
    with pytest.raises(LedgerMismatch) as err:
        verify(ledger, c, **kw)
    message = str(err.value)
    assert err.value.field.startswith(field), message
    assert "results/runs/x/privacy.json" in message and "nothing was trained" in message and "delete" in message
    return err.value


def test_a_cells_own_ledger_verifies_and_gives_its_noise(own):
    verified = verify(own, cell())
    assert verified.release.scale == pytest.approx(own["sigma"] * ZOSO["clip"], rel=1e-15)
    assert verified.release.divisor == ZOSO["batch_size"] and verified.accountant == "pld"
    # the trainer's recomputation is the accountant's own value, within the target
    assert verified.epsilon == pytest.approx(own["epsilon_achieved"]["pld"], rel=1e-12) and verified.epsilon <= 4.0


def test_less_noise_than_the_sigma_says_is_refused(own):
    refused(own | {"noise_std_on_sum": own["noise_std_on_sum"] / 2}, cell(), "noise_std_on_sum")


def test_a_smaller_sigma_that_does_not_buy_the_target_is_refused(own):
    sigma = own["sigma"] * 0.9
    err = refused(own | {"sigma": sigma, "noise_std_on_sum": sigma * ZOSO["clip"]}, cell(), "epsilon of its noise")
    assert err.in_ledger > 4.0  # the recomputed epsilon, not the ledger's claim
    assert accountants.epsilon(sigma, ZOSO["batch_size"] / N, ZOSO["steps"], 1e-5) == pytest.approx(
        err.in_ledger, rel=1e-12
    )


def test_another_cells_ledger_is_refused_even_when_its_labels_are_rewritten(own):
    eps2 = cell(eps="2")
    refused(own, eps2, "cell.eps")
    forged = own | {"cell": eps2.as_dict(), "epsilon_target": 2.0}
    refused(forged, eps2, "epsilon of its noise")  # an eps = 4 sigma does not buy eps = 2
    for change in ({"seed": 42}, {"model": "other"}, {"task": "demo-trec"}, {"method": "dp-zoso+v"}):
        refused(own, cell(**change), "cell.")


def test_the_sigma_zero_ledger_of_the_audit_target_is_refused(own):
    no_noise = ledger_for(cell(eps="inf"))
    assert no_noise["sigma"] == 0 and no_noise["private"] is False
    refused(no_noise, cell(), "cell.eps")
    forged = no_noise | {"cell": cell().as_dict(), "epsilon_target": 4.0}
    refused(forged, cell(), "private")
    refused(forged | {"private": True}, cell(), "delta" if no_noise["delta"] != 1e-5 else "sigma")


def test_a_ledger_made_under_another_delta_accountant_or_convention_is_refused(own):
    refused(own, cell(), "delta", settings=AccountingSettings(delta=1e-6))
    refused(own, cell(), "accountant", settings=AccountingSettings(delta=1e-5, accountant="rdp"))
    refused(own, cell(), "convention", settings=AccountingSettings(delta=1e-5, convention="published"))


def test_the_noise_source_must_be_the_trainers():
    insecure = AccountingSettings(delta=1e-5, noise="insecure test seed 7")
    test_noise = ledger_for(cell(), settings=insecure)
    assert test_noise["noise"] == "insecure test seed 7"
    refused(test_noise, cell(), "noise")  # a secure process never takes a test-noise ledger
    refused(ledger_for(cell()), cell(), "noise", settings=insecure)  # nor the other way round


def test_a_ledger_of_other_hyperparameters_is_refused(own):
    for key, value in (("steps", 5), ("batch_size", 16), ("clip", 1.0)):
        refused(own, cell(), {"batch_size": "expected_batch_size"}.get(key, key), params=ZOSO | {key: value})
    refused(own, cell(), "n", n=N + 1)


def test_laplace_scale_is_recomputed():
    params = {"steps": 3, "batch_size": 8, "lr": 1e-3, "clip": 0.05}
    c = cell(method="dp-zo-laplace", eps="8")
    own = ledger_for(c, params)
    verified = verify(own, c, params)
    assert verified.release.mechanism == "laplace" and verified.release.scale == own["laplace_scale_on_sum"]
    assert verified.epsilon == pytest.approx(8.0, rel=1e-12)
    refused(own | {"laplace_scale_on_sum": own["laplace_scale_on_sum"] / 2}, c, "epsilon of its noise", params=params)


def test_dp_sgd_ledger_is_verified_the_same_way():
    params = {"steps": 40, "batch_size": 8, "lr": 1e-3, "clip": 1.0}
    c = cell(method="dp-sgd")
    own = ledger_for(c, params)
    assert verify(own, c, params).sigma == own["sigma"]
    sigma = own["sigma"] / 2
    refused(own | {"sigma": sigma, "noise_std_on_sum": sigma}, c, "epsilon of its noise", params=params)


def test_dpzero_published_accounting_is_recomputed_with_opacus():
    params = {"steps": 40, "batch_size": 8, "lr": 1e-3, "clip": 2.0}
    c = cell(method="dpzero")
    published = AccountingSettings(delta=1e-5, convention="published")
    own = ledger_for(c, params, published)
    verified = verify(own, c, params, published)
    assert verified.accountant == "opacus-rdp" and verified.epsilon <= 4.0 * (1 + 1e-9)
    assert verified.release.scale == pytest.approx(2 * own["sigma"] * 2.0)  # replace-one: 2 sigma C
    sigma = own["sigma"] * 0.8
    refused(
        own | {"sigma": sigma, "noise_std_on_sum": 2 * sigma * 2.0},
        c,
        "epsilon of its noise",
        params=params,
        settings=published,
    )


def test_non_private_cells_check_their_identity_only():
    c = cell(method="mezo", eps="inf")
    params = {"steps": 2, "batch_size": 4, "lr": 1e-3}
    own = cell_ledger(
        c,
        hyperparameters_for("mezo", params),
        n=N,
        settings=AccountingSettings(delta=1e-5, noise="none (no privacy claim)"),
    )
    settings = AccountingSettings(delta=1e-5, noise="none (no privacy claim)")
    assert verify(own, c, params, settings).release is None
    refused(own, cell(method="mezo", eps="inf", seed=1), "cell.seed", params=params, settings=settings)


def test_count_check_names_the_field():
    hp = hyperparameters_for("dp-sgd", {"steps": 7, "batch_size": 2, "lr": 1e-3, "clip": 0.5})
    ledger = {
        "n": 8,
        "steps": 7,
        "directions": 1,
        "compositions": 7,
        "expected_batch_size": 2.0,
        "clip": 0.5,
        "q": 0.25,
    }
    check_counts(ledger, n=8, hp=hp, method="dp-sgd")
    with pytest.raises(LedgerMismatch, match="steps is 8 in the ledger but 7"):
        check_counts(ledger | {"steps": 8}, n=8, hp=hp, method="dp-sgd")


# ---------------------------------------------------------------------------------------------
# the calibration cache and damaged files
# ---------------------------------------------------------------------------------------------


def test_a_poisoned_calibration_cache_entry_is_recomputed(tmp_path):
    args = dict(n=N, batch_size=8, steps=40, clip=2.0, epsilon_target=2.0, delta=1e-5)
    fresh = records.accounting_record(**args, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.json")
    stored = json.loads(entry.read_text())
    stored["value"]["sigma"] = fresh["sigma"] / 3  # less noise under the same key
    entry.write_text(json.dumps(stored))
    again = records.accounting_record(**args, cache_dir=tmp_path)
    assert again["sigma"] == fresh["sigma"]
    assert json.loads(entry.read_text())["value"]["sigma"] == fresh["sigma"]  # replaced
    entry.write_text('{"key": ')  # truncated: rebuilt, not fatal
    assert records.accounting_record(**args, cache_dir=tmp_path)["sigma"] == fresh["sigma"]


def test_a_truncated_output_is_moved_aside_and_named(tmp_path):
    path = tmp_path / "privacy.json"
    path.write_text('{"sigma": 1.')
    with pytest.raises(CorruptOutput) as err:
        read_json_output(path)
    assert str(path) in str(err.value) and "next run" in str(err.value)
    assert not path.exists() and (tmp_path / "privacy.json.corrupt").read_text() == '{"sigma": 1.'
    path.write_text('{"sigma": 1.0}')
    assert read_json_output(path) == {"sigma": 1.0}


def test_epsilon_of_the_cell_path():
    assert cell(eps="inf").epsilon == math.inf and cell(eps="0.5").epsilon == 0.5


# ---------------------------------------------------------------------------------------------
# every recomputed ε counts what the trainer releases; absurd noise is refused cheaply
# ---------------------------------------------------------------------------------------------


def test_dpzero_published_accounting_counts_every_direction():
    """A forged ledger claiming P = 2 under DPZero's published accounting (whose account rule
    allows only P = 1): the trainer would release T·P scalars, so ε is recomputed over all of them."""
    params = {"steps": 40, "batch_size": 8, "lr": 1e-3, "clip": 2.0}
    c = cell(method="dpzero")
    published = AccountingSettings(delta=1e-5, convention="published")
    own = ledger_for(c, params, published)
    forged = own | {"directions": 2, "compositions": 80}
    err = refused(forged, c, "epsilon of its noise", params=params | {"directions": 2}, settings=published)
    assert err.in_ledger == pytest.approx(accountants.opacus_epsilon(own["sigma"], 1e-5, 8 / N, 80), rel=1e-12)
    assert err.in_ledger > 4.0 >= accountants.opacus_epsilon(own["sigma"], 1e-5, 8 / N, 40) * (1 - 1e-9)


def no_accountant(monkeypatch):
    """Make every accountant evaluation fail: what passes ran on the cheap bound alone."""

    def boom(*args, **kwargs):
        raise AssertionError("the accountant ran on a noise the cheap bound refuses")

    for name in ("_epsilon_pld", "_epsilon_prv", "_epsilon_rdp", "opacus_epsilon"):
        monkeypatch.setattr(accountants, name, boom)


@pytest.mark.parametrize("accountant", ["pld", "prv", "rdp", "dpzero-published"])
def test_an_absurd_sigma_is_refused_by_the_cheap_bound_without_the_accountant(monkeypatch, accountant):
    method = "dpzero" if accountant == "dpzero-published" else "dp-zoso"
    settings = (
        AccountingSettings(delta=1e-5, convention="published")
        if method == "dpzero"
        else AccountingSettings(delta=1e-5, accountant=accountant, convention="common", noise="secure")
    )
    c = cell(method=method, eps="8")
    # a PLD-calibrated ledger relabelled (PRV's own calibration cannot be made at every setting)
    own = ledger_for(c, ZOSO, settings if method == "dpzero" else SETTINGS)
    if method != "dpzero":
        own |= {"accountant": accountant, "calibrated_with": accountant}
    factor = 2.0 if method == "dpzero" else 1.0
    forged = own | {"sigma": 0.01, "noise_std_on_sum": factor * 0.01 * ZOSO["clip"]}
    no_accountant(monkeypatch)
    err = refused(forged, c, "epsilon of its noise (already its first release alone)", params=ZOSO, settings=settings)
    bound = float(err.in_ledger.removeprefix("at least "))
    assert bound > 100 and bound == pytest.approx(accountants.single_release_epsilon(0.01, 8 / N, 1e-5), rel=1e-5)


def test_an_absurd_sigma_in_the_calibration_cache_is_refused_without_the_accountant(tmp_path, monkeypatch):
    args = dict(n=N, batch_size=8, steps=40, clip=2.0, epsilon_target=2.0, delta=1e-5)
    fresh = records.accounting_record(**args, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.json")
    stored = json.loads(entry.read_text())
    stored["value"]["sigma"] = 0.01
    entry.write_text(json.dumps(stored))
    real = accountants._epsilon_pld

    def pld(sigma, *args):
        assert sigma > 0.1, "the PLD accountant ran on the cache's absurd sigma"
        return real(sigma, *args)

    monkeypatch.setattr(accountants, "_epsilon_pld", pld)
    assert records.accounting_record(**args, cache_dir=tmp_path)["sigma"] == fresh["sigma"]


@pytest.mark.parametrize("sigma", [0.3, 0.7, 1.5, 4.0])
@pytest.mark.parametrize("eps", [0.1, 1.0, 3.0])
def test_one_release_without_subsampling_has_the_gaussian_mechanisms_closed_form(sigma, eps):
    """q = 1: the analytic Gaussian mechanism (Balle & Wang 2018, Theorem 8),
    δ(ε) = Φ(1/(2σ) - εσ) - e^ε Φ(-1/(2σ) - εσ)."""
    from scipy.stats import norm

    expected = norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma)
    assert accountants.single_release_delta(sigma, 1.0, eps) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@pytest.mark.parametrize(("sigma", "q"), [(0.6, 0.01), (1.0, 0.05), (0.8, 1.0), (2.0, 0.25), (5.0, 0.1)])
def test_the_one_release_bound_is_the_pld_accountants_value_for_one_release_and_below_it_for_many(sigma, q):
    bound = accountants.single_release_epsilon(sigma, q, 1e-5)
    one = accountants.epsilon(sigma, q, 1, 1e-5, "pld")
    assert bound <= one and bound == pytest.approx(one, rel=2e-3)  # PLD is a pessimistic bound of the same ε
    assert bound <= accountants.epsilon(sigma, q, 20, 1e-5, "rdp")
