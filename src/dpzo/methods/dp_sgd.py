"""DP-SGD (Abadi et al. 2016) on every weight: per-example gradients clipped to C, Gaussian noise
on the sum, Poisson batches; checked against Opacus (``dpzo.baselines.firstorder``)."""

from dpzo.methods.base import FirstOrderMethod


class DPSGD(FirstOrderMethod):
    """DP-SGD on every trainable weight: one Poisson-subsampled Gaussian release per step."""

    name = "dp-sgd"
    private = True
    mechanism = "gaussian"


METHOD = DPSGD()
