"""DP-AggZO (USENIX Security 2025): K directions on one batch, one K-dimensional release per step.

Per step, one Poisson batch and K public directions z_1..z_K.  Example i contributes the vector
of its K finite-difference quotients divided by K, clipped in L2 norm to C; the clipped vectors
are summed, N(0, σ² C² I_K) is added, and the result is divided by the expected batch size q n:

    ĝ = ( Σ_i clip_C( (d_i1, ..., d_iK) / K ) + σ C ν ) / (q n),     ν ~ N(0, I_K)
    θ <- θ - η Σ_k ĝ_k z_k

One release per step of a vector with L2 sensitivity C: T compositions (not T K), and the
Gaussian mechanism of a K-vector with L2 sensitivity C has the privacy loss distribution of the
scalar one, so the ledger calibrates σ exactly as for DP-ZOSO with one direction.

Where this differs from the released code (erguteb/dp-aggzo): their noise is drawn from a
generator re-seeded with the public direction seed (anyone holding the seed can subtract it);
ours comes from the secret RNG.  They spend 5 % of ε on a Laplace-noised training-set size to
normalise by a noisy q n; we divide by q n as every method here does (n public, as in Opacus'
expected-batch-size normalisation), so the whole ε goes to the Gaussian releases.
"""

from typing import Any

from dpzo.methods.base import PrivateZOMethod


class DPAggZO(PrivateZOMethod):
    """DP-AggZO: ``directions`` = K share a batch; the per-example K-vector is clipped in L2."""

    name = "dp-aggzo"

    def release_groups(self, seeds: list[int]) -> list[list[int]]:
        """All K directions of a step share one batch and one release."""
        return [list(seeds)]

    def release_group(
        self, ds: list[Any], *, clip: float, beta: float, noise: Any = None, secret: Any = None
    ) -> tuple[list[Any], Any]:
        """Clip each example's K-vector of quotients / K to L2 norm C, sum, add N(0, σ²C² I_K), / q n.

        Returns K ĝ_k per direction (the trainer averages over the step's directions, so the
        update is Σ_k ĝ_k z_k) and how many examples the clip changed.
        """
        if noise is None or secret is None:
            raise ValueError(f"{self.name} releases through the ledger's noise and the secret RNG")
        k = len(ds)
        vectors = ds[0].new_zeros((ds[0].shape[0], k))
        for j, d in enumerate(ds):
            vectors[:, j] = d / k
        norms = vectors.norm(dim=1)
        clipped = (norms > clip).sum()
        scale = (clip / norms).clamp(max=1.0)  # a zero vector: inf, clamped to 1
        released = noise.release((vectors * scale[:, None]).sum(dim=0), secret)
        return list((released * k).unbind()), clipped

    def releases_per_step(self, directions: int) -> int:
        """One K-dimensional release per step, whatever K is."""
        return 1


METHOD = DPAggZO()
