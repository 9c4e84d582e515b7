"""DP-AggZO: one Poisson batch and one K-dimensional release per step, against a float64 reference
and the accountant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpzo.methods import get_method
from dpzo.methods.hyperparameters import ZOHyperparameters
from dpzo.privacy.mechanisms import NoisySum
from dpzo.privacy.records import method_ledger
from dpzo.privacy.secret import SecretRandom
from dpzo.zo.flat import direction_seed, gaussian_direction
from dpzo.zo.loop import train_zo

from .test_zo import Quadratic, TwoTensorModel


def reference_aggzo(quad, theta0, hp, *, run_seed, noise_std, noise_seed, n):
    """Hand-written DP-AggZO in numpy float64: per step one batch, the K-vector of quotients / K
    per example clipped in L2 to C, summed, N(0, noise_std^2 I_K), / q n; theta -= lr sum_k g_k z_k."""
    rng = SecretRandom(insecure_test_seed=noise_seed)
    theta, q, k = theta0.copy(), hp.batch_size / n, hp.directions
    for t in range(hp.steps):
        index = rng.poisson_batch(n, q)
        zs = [
            gaussian_direction(direction_seed(run_seed, t, j), theta.size, dtype=torch.float64).numpy()
            for j in range(k)
        ]
        vectors = np.stack([quad.directional_np(theta, z, index) for z in zs], axis=1) / k  # [B, K]
        norms = np.linalg.norm(vectors, axis=1)
        factors = np.minimum(1.0, hp.clip / np.where(norms > 0, norms, np.inf))
        g = ((vectors * factors[:, None]).sum(axis=0) + noise_std * rng.standard_normal_array(k)) / (q * n)
        theta = theta - hp.lr * sum(g_j * z for g_j, z in zip(g, zs))
    return theta


def test_dp_aggzo_matches_the_float64_reference_and_releases_once_per_step():
    quad, model = Quadratic(n=40), TwoTensorModel()
    hp = ZOHyperparameters(steps=9, batch_size=8, lr=2e-2, clip=5.0, directions=4, log_every=1)
    theta0 = model.theta().detach().numpy().copy()
    history = train_zo(
        model,
        quad.loss_fn(model),
        40,
        hp,
        method="dp-aggzo",
        run_seed=11,
        noise=NoisySum("gaussian", 0.5, 8.0),
        secret=SecretRandom(insecure_test_seed=4),
        master_dtype=torch.float64,
    )
    expected = reference_aggzo(quad, theta0, hp, run_seed=11, noise_std=0.5, noise_seed=4, n=40)
    np.testing.assert_allclose(model.theta().detach().numpy(), expected, rtol=0, atol=1e-12)
    assert history["releases"] == hp.steps  # T releases of a K-vector, not T K
    assert 0 < min(history["clipped_fraction"]) < 1  # the L2 clip binds, for some examples only
    assert np.abs(model.theta().detach().numpy() - theta0).max() > 1e-3


def test_a_k_dimensional_release_is_accounted_as_one_scalar_release_per_step():
    """The Gaussian mechanism on a K-vector with L2 sensitivity C has the scalar one's privacy
    loss distribution, so DP-AggZO's sigma is DP-ZOSO's with one direction (T compositions)."""
    kw = dict(n=512, batch_size=32, steps=50, clip=2.0, epsilon_target=2.0, delta=1e-5)
    agg = method_ledger("dp-aggzo", directions=16, **kw)
    one = method_ledger("dp-zoso", directions=1, **kw)
    many = method_ledger("dp-zoso", directions=16, **kw)
    assert agg["compositions"] == 50 and agg["directions"] == 16 and agg["sensitivity"] == 2.0
    assert agg["sigma"] == pytest.approx(one["sigma"], rel=1e-12)
    assert agg["epsilon_achieved"] == one["epsilon_achieved"]
    assert many["sigma"] > 2 * agg["sigma"]  # 16 separate releases per step would cost far more noise
    assert (
        get_method("dp-aggzo").compositions(
            ZOHyperparameters(steps=50, batch_size=32, lr=1e-3, directions=16, clip=2.0)
        )
        == 50
    )


def test_the_noise_of_a_vector_release_is_drawn_from_the_secret_rng_one_entry_each():
    noise = NoisySum("gaussian", 3.0, 4.0)
    summed = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    got = noise.release(summed, SecretRandom(insecure_test_seed=8))
    draws = SecretRandom(insecure_test_seed=8).standard_normal_array(3)
    torch.testing.assert_close(got, (summed + 3.0 * torch.from_numpy(draws)) / 4.0, rtol=0, atol=1e-15)
    assert torch.equal(summed, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))  # the caller's sum untouched
    with pytest.raises(ValueError, match="vector release is Gaussian"):
        NoisySum("laplace", 1.0, 1.0).release(summed, SecretRandom(insecure_test_seed=1))


def test_an_empty_batch_releases_the_noise_vector_alone():
    spec = get_method("dp-aggzo")
    empty = [torch.zeros(0, dtype=torch.float64) for _ in range(3)]
    grads, clipped = spec.release_group(
        empty, clip=1.0, beta=1e-3, noise=NoisySum("gaussian", 2.0, 5.0), secret=SecretRandom(insecure_test_seed=3)
    )
    draws = SecretRandom(insecure_test_seed=3).standard_normal_array(3)
    np.testing.assert_allclose([float(g) for g in grads], 3 * 2.0 * draws / 5.0, rtol=1e-15)
    assert int(clipped) == 0
