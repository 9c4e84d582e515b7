"""Zeroth-order step, schedule and trainer against independent float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpzo.methods import hyperparameters_for
from dpzo.methods.hyperparameters import StageSchedule, ZOHyperparameters
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.secret import SecretRandom
from dpzo.zo.flat import FlatParameters, direction_seed, gaussian_direction, spsa_differences
from dpzo.zo.loop import train_zo
from dpzo.zo.precision import MIN_BETA_ULPS, check_zo_scale
from dpzo.zo.step import apply_update, clip_differences


class TwoTensorModel(torch.nn.Module):
    """theta = (w [3x2], b [4]) so that flattening order and views are exercised."""

    def __init__(self, dtype=torch.float64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(3, 2, generator=g, dtype=dtype))
        self.b = torch.nn.Parameter(torch.randn(4, generator=g, dtype=dtype))

    def theta(self) -> torch.Tensor:
        return torch.cat([self.w.reshape(-1), self.b])


class Quadratic:
    """Per-example losses l_i(theta) = 0.5 ||A_i theta - y_i||^2 on a fixed random dataset."""

    def __init__(self, n=40, dim=10, seed=1):
        rng = np.random.default_rng(seed)
        self.A = rng.normal(size=(n, 3, dim))
        self.y = rng.normal(size=(n, 3))

    def losses_np(self, theta: np.ndarray, index) -> np.ndarray:
        r = self.A[index] @ theta - self.y[index]
        return 0.5 * (r**2).sum(axis=1)

    def directional_np(self, theta: np.ndarray, z: np.ndarray, index) -> np.ndarray:
        """Exact d_i = grad l_i(theta) . z (symmetric differences are exact on quadratics)."""
        r = self.A[index] @ theta - self.y[index]
        return np.einsum("ij,ij->i", r, self.A[index] @ z)

    def loss_fn(self, model: TwoTensorModel):
        A = torch.from_numpy(self.A)
        y = torch.from_numpy(self.y)

        def per_example_loss(index):
            index = torch.as_tensor(np.asarray(index), dtype=torch.long)
            r = torch.einsum("bkd,d->bk", A[index], model.theta()) - y[index]
            return 0.5 * (r**2).sum(dim=1)

        return per_example_loss


def test_perturb_then_restore_is_bit_exact_fp32():
    model = TwoTensorModel(dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    flat = FlatParameters(model)
    flat.perturb(seed=123, scale=1e-3)
    assert not torch.equal(model.w, before[0])  # the perturbation really moves the weights
    flat.perturb(seed=123, scale=-1e-3)
    flat.restore()
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0)


def test_parameters_are_views_of_the_flat_buffer():
    model = TwoTensorModel()
    flat = FlatParameters(model)
    flat.work[0] = 42.0
    assert model.w[0, 0].item() == 42.0
    assert flat.numel == 10


def test_perturbation_is_master_plus_scaled_direction():
    model = TwoTensorModel()
    flat = FlatParameters(model, master_dtype=torch.float64)
    theta0 = model.theta().detach().clone()
    flat.perturb(seed=7, scale=0.5)
    z = gaussian_direction(7, 10, dtype=torch.float64)
    assert torch.equal(model.theta().detach(), theta0 + 0.5 * z)


def test_direction_is_a_pure_function_of_its_seed():
    z1 = gaussian_direction(99, 1000)
    z2 = gaussian_direction(99, 1000)
    z3 = gaussian_direction(100, 1000)
    assert torch.equal(z1, z2) and not torch.equal(z1, z3)
    # standard normal: mean ~ 0, variance ~ 1 (loose 6-sigma bounds)
    assert abs(z1.mean().item()) < 6 / math.sqrt(1000)
    assert abs(z1.var().item() - 1) < 6 * math.sqrt(2 / 1000)
    seeds = {direction_seed(13, t, p) for t in range(50) for p in range(3)}
    assert len(seeds) == 150


def test_spsa_differences_match_exact_directional_derivative():
    quad = Quadratic()
    model = TwoTensorModel()
    flat = FlatParameters(model, master_dtype=torch.float64)
    theta = model.theta().detach().numpy().copy()
    index = np.arange(8)
    d, _, _ = spsa_differences(lambda: quad.loss_fn(model)(index), flat, seed=5, beta=1e-3)
    z = gaussian_direction(5, 10, dtype=torch.float64).numpy()
    np.testing.assert_allclose(d.numpy(), quad.directional_np(theta, z, index), rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(model.theta().detach().numpy(), theta)  # restored


def test_clip_is_symmetric_and_inf_is_identity():
    d = torch.tensor([-10.0, -1.0, 0.0, 2.0, 30.0])
    assert clip_differences(d, 5.0).tolist() == [-5.0, -1.0, 0.0, 2.0, 5.0]
    assert torch.equal(clip_differences(d, math.inf), d)


def test_proximal_pull_moves_toward_anchor_and_not_along_z():
    model = TwoTensorModel()
    flat = FlatParameters(model, master_dtype=torch.float64)
    anchor = flat.snapshot()
    flat.master.add_(torch.linspace(-1, 1, 10, dtype=torch.float64))  # move away from the anchor
    flat.restore()
    theta = flat.master.clone()
    apply_update(flat, seeds=[11], grads=[0.0], lr=0.1, lam=0.5, anchor=anchor)
    expected = theta - 0.1 * 0.5 * (theta - anchor)
    torch.testing.assert_close(flat.master, expected, rtol=0, atol=1e-15)
    assert torch.norm(flat.master - anchor) < torch.norm(theta - anchor)
    assert anchor.data_ptr() != flat.master.data_ptr()  # a real copy, not an alias


def test_update_with_several_directions_averages_them():
    model = TwoTensorModel()
    flat = FlatParameters(model, master_dtype=torch.float64)
    theta = flat.master.clone()
    apply_update(flat, seeds=[1, 2], grads=[0.3, -0.7], lr=0.01)
    z1 = gaussian_direction(1, 10, dtype=torch.float64)
    z2 = gaussian_direction(2, 10, dtype=torch.float64)
    torch.testing.assert_close(flat.master, theta - 0.01 * (0.3 * z1 - 0.7 * z2) / 2, rtol=0, atol=1e-15)
    assert torch.equal(model.theta().detach(), flat.master)  # work follows master


def test_stage_schedule_lengths_lr_and_beta():
    s = StageSchedule(steps=100, stages=3, stage_steps=10, lr=1e-3, beta_start=1e-4, beta_end=1e-2)
    assert s.stage_starts() == [0, 10, 30]
    assert [s.stage_of(t) for t in (0, 9, 10, 29, 30, 99)] == [0, 0, 1, 1, 2, 2]
    assert [s.lr_at(i) for i in range(3)] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    assert [s.beta_at(i) for i in range(3)] == pytest.approx([1e-4, 1e-3, 1e-2])
    down = StageSchedule(steps=100, stages=3, stage_steps=10, beta_start=1e-2, beta_end=1e-4)
    assert [down.beta_at(i) for i in range(3)] == pytest.approx([1e-2, 1e-3, 1e-4])  # no NaN
    # a stage that would start after the last step is refused: beta would never reach
    # beta_end, nor an incremental mask its ratio
    with pytest.raises(ValueError, match="do not all start within 25 steps"):
        StageSchedule(steps=25, stages=3, stage_steps=10)
    assert StageSchedule(steps=31, stages=3, stage_steps=10).stage_starts() == [0, 10, 30]
    constant = StageSchedule(steps=50, stages=1, beta_start=1e-3, beta_end=1e-3)
    assert constant.stage_starts() == [0] and constant.beta_at(0) == 1e-3


def reference_dpzoso(quad, theta0, hp, *, run_seed, sigma, noise_seed, n):
    """Hand-written DP-ZOSO in numpy float64, independent of the trainer's code path."""
    rng = SecretRandom(insecure_test_seed=noise_seed)
    theta = theta0.copy()
    starts = [0]
    while len(starts) < hp.stages and starts[-1] + hp.stage_steps * 2 ** (len(starts) - 1) < hp.steps:
        starts.append(starts[-1] + hp.stage_steps * 2 ** (len(starts) - 1))
    anchor = theta.copy()
    q = hp.batch_size / n
    for t in range(hp.steps):
        s = max(i for i, st in enumerate(starts) if st <= t)
        if t == starts[s]:
            anchor = theta.copy()
        lr = hp.lr * hp.lr_decay**s
        step = np.zeros_like(theta)
        batches = [rng.poisson_batch(n, q) for _ in range(hp.directions)]  # every batch before any noise
        for p, index in enumerate(batches):
            z = gaussian_direction(direction_seed(run_seed, t, p), theta.size, dtype=torch.float64).numpy()
            d = quad.directional_np(theta, z, index)  # exact on a quadratic, for any beta
            g = (np.clip(d, -hp.clip, hp.clip).sum() + sigma * hp.clip * rng.standard_normal()) / (q * n)
            step += g * z / hp.directions
        theta = theta - lr * (step + hp.lam * (theta - anchor))
    return theta


@pytest.mark.parametrize("directions,lam", [(1, 0.0), (2, 0.3)])
def test_dpzoso_trainer_matches_float64_reference(directions, lam):
    quad = Quadratic(n=40)
    hp = ZOHyperparameters(
        steps=14,
        batch_size=8,
        lr=1e-2,
        stages=3,
        stage_steps=2,
        beta_start=1e-4,
        beta_end=1e-2,
        lam=lam,
        clip=3.0,
        directions=directions,
        log_every=1,
    )
    model = TwoTensorModel()
    theta0 = model.theta().detach().numpy().copy()
    history = train_zo(
        model,
        quad.loss_fn(model),
        40,
        hp,
        method="dp-zoso",
        run_seed=13,
        noise=NoisySum("gaussian", 0.7 * 3.0, 8.0),
        secret=SecretRandom(insecure_test_seed=5),
        master_dtype=torch.float64,
    )
    expected = reference_dpzoso(quad, theta0, hp, run_seed=13, sigma=0.7, noise_seed=5, n=40)
    np.testing.assert_allclose(model.theta().detach().numpy(), expected, rtol=0, atol=1e-12)
    assert history["steps_run"] == 14 and history["releases"] == 14 * directions
    assert history["stage_starts"] == [0, 2, 6]
    assert np.abs(model.theta().detach().numpy() - theta0).max() > 1e-3  # it did move


def test_trainer_runs_exactly_t_steps_with_two_forwards_per_release():
    quad = Quadratic(n=40)
    model = TwoTensorModel()
    inner = quad.loss_fn(model)
    calls = []

    def counting_loss(index):
        calls.append(len(index))
        return inner(index)

    hp = ZOHyperparameters(steps=9, batch_size=8, lr=1e-3, clip=1.0, directions=3)
    history = train_zo(
        model,
        counting_loss,
        40,
        hp,
        method="dp-zoso",
        run_seed=0,
        noise=NoisySum("gaussian", 1.0, 8.0),
        secret=SecretRandom(insecure_test_seed=1),
    )
    nonempty = [c for c in calls if c > 0]
    assert history["releases"] == 27
    assert len(calls) == len(nonempty) <= 2 * 27 and len(calls) % 2 == 0


def test_mezo_is_the_mean_finite_difference_step():
    quad = Quadratic(n=40)
    model = TwoTensorModel()
    theta = model.theta().detach().numpy().copy()
    hp = ZOHyperparameters(steps=1, batch_size=40, lr=1e-2)  # full batch: no sampling randomness
    train_zo(model, quad.loss_fn(model), 40, hp, method="mezo", run_seed=3, master_dtype=torch.float64)
    z = gaussian_direction(direction_seed(3, 0, 0), 10, dtype=torch.float64).numpy()
    g = quad.directional_np(theta, z, np.arange(40)).mean()
    np.testing.assert_allclose(model.theta().detach().numpy(), theta - 1e-2 * g * z, rtol=0, atol=1e-12)


def test_private_method_without_secret_rng_is_refused():
    quad = Quadratic(n=40)
    model = TwoTensorModel()
    hp = ZOHyperparameters(steps=1, batch_size=8, lr=1e-3, clip=1.0)
    with pytest.raises(ValueError, match="secret"):
        train_zo(model, quad.loss_fn(model), 40, hp, method="dp-zoso", run_seed=0)


def test_masked_step_touches_only_the_mask_and_matches_a_dense_reference():
    quad = Quadratic(n=40)
    model = TwoTensorModel(dtype=torch.float32)  # float32 weights: bit-identity is the strict test
    theta0 = model.theta().detach().clone()
    idx = torch.tensor([1, 4, 5, 9])
    flat = FlatParameters(model, master_dtype=torch.float64)
    flat.set_mask(idx)
    anchor = flat.snapshot()
    assert anchor.shape == (4,)
    index = np.arange(10)
    A, y = torch.from_numpy(quad.A).float(), torch.from_numpy(quad.y).float()

    def loss32():
        r = torch.einsum("bkd,d->bk", A[index], model.theta()) - y[index]
        return 0.5 * (r**2).sum(dim=1)

    d, _, _ = spsa_differences(loss32, flat, seed=21, beta=1e-2)
    apply_update(flat, [21], [float(d.mean())], lr=0.05, lam=0.2, anchor=anchor)
    after = model.theta().detach()
    outside = torch.ones(10, dtype=torch.bool)
    outside[idx] = False
    assert torch.equal(after[outside], theta0[outside])  # bit-identical outside the mask
    # reference: the dense direction restricted to the mask, in float64
    z = gaussian_direction(21, 10, dtype=torch.float64) * (~outside).double()
    theta = theta0.double()
    g = float(d.mean())
    expected = theta - 0.05 * g * z  # anchor == theta at this step, so the pull is zero
    torch.testing.assert_close(after.double(), expected.float().double(), rtol=0, atol=1e-6)
    assert not torch.equal(after[~outside], theta0[~outside])  # and the mask really moved


def test_mask_direction_equals_dense_direction_at_the_masked_coordinates():
    model = TwoTensorModel()
    flat = FlatParameters(model, master_dtype=torch.float64)
    idx = torch.tensor([0, 3, 7])
    flat.set_mask(idx)
    dense = gaussian_direction(5, 10, dtype=torch.float64)
    assert torch.equal(flat.direction(5), dense[idx])


def test_rank_scales_multiply_perturbation_and_optionally_the_update():
    model = TwoTensorModel()
    flat = FlatParameters(model, master_dtype=torch.float64)
    idx = torch.tensor([2, 6])
    scales = torch.tensor([1.2, 0.8], dtype=torch.float64)
    flat.set_mask(idx, perturb_scales=scales)
    theta0 = flat.master.clone()
    flat.perturb(3, 0.1)
    z = gaussian_direction(3, 10, dtype=torch.float64)[idx]
    torch.testing.assert_close(flat.work[idx], theta0[idx] + 0.1 * scales * z, rtol=0, atol=1e-15)
    flat.restore()
    flat.add_directions([(3, -0.5)])  # perturb_scales do not scale the update
    torch.testing.assert_close(flat.master[idx], theta0[idx] - 0.5 * z, rtol=0, atol=1e-15)


def test_bad_mask_is_refused():
    flat = FlatParameters(TwoTensorModel())
    for bad in (torch.tensor([3, 1]), torch.tensor([1, 1]), torch.tensor([10]), torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="mask indices"):
            flat.set_mask(bad)


def reference_raw_difference_clipping(quad, theta0, hp, *, run_seed, noise_seed, n, laplace_b=None, gauss_std=None):
    """Tang et al.'s release in numpy: clip l+ - l- (= 2 beta d on a quadratic), noise, / (q n 2 beta)."""
    rng = SecretRandom(insecure_test_seed=noise_seed)
    theta = theta0.copy()
    q = hp.batch_size / n
    beta = hp.beta_start
    for t in range(hp.steps):
        index = rng.poisson_batch(n, q)
        z = gaussian_direction(direction_seed(run_seed, t, 0), theta.size, dtype=torch.float64).numpy()
        raw = 2 * beta * quad.directional_np(theta, z, index)
        noise = gauss_std * rng.standard_normal() if laplace_b is None else laplace_b * rng.standard_laplace()
        g = (np.clip(raw, -hp.clip, hp.clip).sum() + noise) / (q * n) / (2 * beta)
        theta = theta - hp.lr * g * z
    return theta


@pytest.mark.parametrize("method", ["dp-zo-gauss", "dp-zo-laplace"])
def test_tang_dp_zo_clips_the_raw_difference(method):
    quad = Quadratic(n=40)
    hp = ZOHyperparameters(steps=8, batch_size=8, lr=1e-3, beta_start=1e-2, beta_end=1e-2, clip=0.05)
    model = TwoTensorModel()
    theta0 = model.theta().detach().numpy().copy()
    mech = "laplace" if method == "dp-zo-laplace" else "gaussian"
    history = train_zo(
        model,
        quad.loss_fn(model),
        40,
        hp,
        method=method,
        run_seed=2,
        noise=NoisySum(mech, 0.03, 8.0),
        secret=SecretRandom(insecure_test_seed=9),
        master_dtype=torch.float64,
    )
    kw = {"laplace_b": 0.03} if mech == "laplace" else {"gauss_std": 0.03}
    expected = reference_raw_difference_clipping(quad, theta0, hp, run_seed=2, noise_seed=9, n=40, **kw)
    np.testing.assert_allclose(model.theta().detach().numpy(), expected, rtol=0, atol=1e-12)
    assert max(history["clipped_fraction"]) > 0  # C = 0.05 on the raw difference does bind here


def test_dpzero_is_a_constant_schedule_dp_zo_step():
    quad = Quadratic(n=40)
    hp = ZOHyperparameters(steps=5, batch_size=8, lr=1e-2, clip=2.0)
    a, b = TwoTensorModel(), TwoTensorModel()
    kw = dict(run_seed=4, noise=NoisySum("gaussian", 1.5, 8.0), master_dtype=torch.float64)
    train_zo(a, quad.loss_fn(a), 40, hp, method="dpzero", secret=SecretRandom(insecure_test_seed=3), **kw)
    train_zo(b, quad.loss_fn(b), 40, hp, method="dp-zoso", secret=SecretRandom(insecure_test_seed=3), **kw)
    assert torch.equal(a.theta(), b.theta())  # with one stage and lam = 0 the two coincide


def test_private_method_needs_a_finite_clip():
    quad = Quadratic(n=40)
    model = TwoTensorModel()
    hp = ZOHyperparameters(steps=1, batch_size=8, lr=1e-3)
    with pytest.raises(ValueError, match="finite clip"):
        train_zo(
            model,
            quad.loss_fn(model),
            40,
            hp,
            method="dpzero",
            run_seed=0,
            noise=NoisySum("gaussian", 1.0, 8.0),
            secret=SecretRandom(insecure_test_seed=1),
        )


# ---------------------------------------------------------------------------------------------
# what really ran, checked against the ledger; faults; noise
# ---------------------------------------------------------------------------------------------


def _ledger(hp, n, sigma=2.0):
    from dpzo.privacy.records import accounting_record

    rec = accounting_record(
        n=n,
        batch_size=hp.batch_size,
        steps=hp.steps,
        directions=hp.directions,
        clip=hp.clip,
        epsilon_target=math.inf,
        delta=1e-5,
        sigma=sigma,
    )
    return rec | {"method": "dp-zoso"}


def _run(hp, ledger, secret, n=40, **kw):
    quad = Quadratic(n=n)
    model = TwoTensorModel()
    return train_zo(
        model,
        quad.loss_fn(model),
        n,
        hp,
        method="dp-zoso",
        run_seed=0,
        noise=NoisySum.from_ledger(ledger),
        secret=secret,
        **kw,
    ), model


def test_ledger_recheck_passes_for_what_ran_and_names_every_mismatch():
    from dpzo.privacy.ledger import check_ledger_after

    hp = ZOHyperparameters(steps=5, batch_size=8, lr=1e-3, clip=1.0, directions=2)
    ledger = _ledger(hp, 40)
    history, _ = _run(hp, ledger, SecretRandom(insecure_test_seed=1))
    assert history["releases"] == 10 and history["steps_run"] == 5 and history["n"] == 40
    check_ledger_after(ledger, history)  # what ran is what was accounted
    tampered = {
        "steps": ({"steps": 6}, "steps: ran 5, accounted 6"),
        "releases": ({"compositions": 12}, "releases: ran 10, accounted 12"),
        "n": ({"n": 41}, "n: ran 40, accounted 41"),
        "q": ({"q": 0.1}, "q: ran 0.2, accounted 0.1"),
        "noise": ({"noise_std_on_sum": 1.0}, "noise on each sum: ran 2.0, accounted 1.0"),
        "divisor": ({"expected_batch_size": 16.0}, "divisor"),
    }
    for change, needle in tampered.values():
        with pytest.raises(RuntimeError, match="privacy ledger mismatch after training") as err:
            check_ledger_after(ledger | change, history)
        assert needle in str(err.value)


class _DoubleRateSampler:
    """A sampler bug: batches drawn at twice the accounted rate (the noise is still secret)."""

    def __init__(self):
        self.inner = SecretRandom(insecure_test_seed=2)

    def poisson_batch(self, n, q):
        return self.inner.poisson_batch(n, 2 * q)

    def standard_normal(self):
        return self.inner.standard_normal()


def test_ledger_recheck_catches_batches_not_drawn_at_the_accounted_rate():
    from dpzo.privacy.ledger import check_ledger_after

    hp = ZOHyperparameters(steps=40, batch_size=8, lr=1e-4, clip=1.0)
    ledger = _ledger(hp, 40)
    history, _ = _run(hp, ledger, _DoubleRateSampler())
    with pytest.raises(RuntimeError, match="not drawn at the accounted rate"):
        check_ledger_after(ledger, history)
    history, _ = _run(hp, ledger, SecretRandom(insecure_test_seed=2))
    check_ledger_after(ledger, history)  # the real sampler passes the same check


def test_non_finite_loss_stops_training_with_the_step():
    model = TwoTensorModel()
    hp = ZOHyperparameters(steps=3, batch_size=8, lr=1e-3, clip=1.0)

    def nan_loss(index):
        return torch.full((len(index),), float("nan"), dtype=torch.float64) * model.theta().sum()

    with pytest.raises(FloatingPointError, match="non-finite loss difference at step 0"):
        train_zo(
            model,
            nan_loss,
            40,
            hp,
            method="dp-zoso",
            run_seed=0,
            noise=NoisySum("gaussian", 1.0, 8.0),
            secret=SecretRandom(insecure_test_seed=1),
        )


def _first_mezo_step(quad: Quadratic, model: TwoTensorModel, run_seed: int) -> tuple[float, np.ndarray]:
    """MeZO's released scalar at step 0 (batch 8 of 40) and its z, computed independently."""
    index = np.random.default_rng([run_seed, 1]).choice(40, size=8, replace=False)
    z = gaussian_direction(direction_seed(run_seed, 0, 0), 10, dtype=torch.float64).numpy()
    return float(quad.directional_np(model.theta().detach().numpy(), z, index).mean()), z


@pytest.mark.parametrize("overflow", ["update", "weights"])
def test_non_finite_update_stops_training(overflow):
    quad = Quadratic(n=40)
    model = TwoTensorModel()
    # update: lr * g does not fit in float32 weights; weights: lr * g fits in float64 (half its
    # largest number) but theta - lr g z overflows (some |z_i| > 2)
    g, z = _first_mezo_step(quad, model, run_seed=6)
    assert np.abs(z).max() > 1.5  # so that lr g fits and lr g z does not
    lr = 1e300 if overflow == "update" else 0.5 * torch.finfo(torch.float64).max / abs(g)
    needle = "non-finite update at step 0" if overflow == "update" else "non-finite weights after step 0"
    hp = ZOHyperparameters(steps=1, batch_size=8, lr=lr)
    master = torch.float32 if overflow == "update" else torch.float64
    with pytest.raises(FloatingPointError, match=needle):
        train_zo(model, quad.loss_fn(model), 40, hp, method="mezo", run_seed=6, master_dtype=master)


def test_same_public_seed_different_noise_unless_the_test_seed_is_set():
    hp = ZOHyperparameters(steps=4, batch_size=8, lr=1e-2, clip=1.0)
    ledger = _ledger(hp, 40)
    (h1, m1), (h2, m2) = (_run(hp, ledger, SecretRandom(), record_releases=True) for _ in range(2))
    assert h1["released"] != h2["released"] and not torch.equal(m1.theta(), m2.theta())
    (h3, m3), (h4, m4) = (_run(hp, ledger, SecretRandom(insecure_test_seed=9), record_releases=True) for _ in range(2))
    assert h3["released"] == h4["released"] and torch.equal(m3.theta(), m4.theta())


def normal_weights(dtype: torch.dtype, numel: int = 20_000, std: float = 0.02) -> torch.nn.Module:
    model = torch.nn.Linear(numel // 100, 100, bias=False)
    with torch.no_grad():
        model.weight.normal_(0.0, std, generator=torch.Generator().manual_seed(0))
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_zo_scale_below_the_weights_precision_is_refused(dtype):
    """beta = 1e-6 on 16-bit weights: theta + beta z rounds back to theta for most coordinates."""
    flat = FlatParameters(normal_weights(dtype), master_dtype=None)
    theta = flat.work.clone()
    median = float(theta.abs().float().median())
    # the oracle: numpy's spacing of the median weight (bfloat16 has numpy's float16 exponent
    # range but 3 fewer mantissa bits)
    spacing = float(np.spacing(np.float16(median))) * (8.0 if dtype == torch.bfloat16 else 1.0)
    floor = MIN_BETA_ULPS * spacing
    z = torch.randn(flat.numel, generator=torch.Generator().manual_seed(1))
    lost = ((theta.float() + 1e-6 * z).to(dtype) == theta).float().mean()
    assert lost > 0.9  # what the guard protects against
    with pytest.raises(ValueError, match=r"beta=1e-06 is below 4 ulp .* Use beta >="):
        check_zo_scale(flat, 1e-6)
    with pytest.raises(ValueError):
        check_zo_scale(flat, 0.9 * floor)
    check_zo_scale(flat, floor)
    check_zo_scale(flat, 1e-3)  # MeZO's and DPZero's 16-bit setting passes
    check_zo_scale(FlatParameters(normal_weights(torch.float32), master_dtype=None), 1e-6)  # fp32: fine


def test_trainer_refuses_a_zo_scale_the_weights_cannot_hold():
    model = normal_weights(torch.float16)
    before = model.weight.detach().clone()
    hp = ZOHyperparameters(steps=2, batch_size=4, lr=1e-3, beta_start=1e-6, beta_end=1e-6)
    with pytest.raises(ValueError, match="rounds back to theta"):
        train_zo(model, lambda index: torch.zeros(len(index)), 8, hp, method="mezo", run_seed=0)
    assert torch.equal(model.weight, before)  # refused before any step


@pytest.mark.parametrize("method", ["mezo", "dpzero", "dp-zo-gauss", "dp-zo-laplace"])
@pytest.mark.parametrize(
    "staged", [{"stages": 2, "stage_steps": 2}, {"lam": 0.1}, {"beta_start": 1e-3, "beta_end": 1e-2}]
)
def test_constant_schedule_methods_refuse_stagewise_settings(method, staged):
    params = {"steps": 8, "batch_size": 4, "lr": 1e-3, "clip": 1.0, **staged}
    with pytest.raises(ValueError, match=f"{method} has a constant schedule"):
        hyperparameters_for(method, params)
    assert hyperparameters_for("dp-zoso", params).steps == 8  # the stagewise method takes them
