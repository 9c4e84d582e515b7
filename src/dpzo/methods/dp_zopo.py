"""DP-ZOPO (Liu et al. 2024): DP-ZOSO on the coordinates of a data-free (SynFlow-style) mask.

The release is DP-ZOSO's; the perturbation and the update touch only the mask's coordinates
(``dpzo.masks``), which cost no privacy because the scores read no training data.
"""

from dpzo.methods.dp_zoso import DPZOSO


class DPZOPO(DPZOSO):
    """DP-ZOSO on the coordinates of a data-free mask only (needs a ``mask`` block)."""

    name = "dp-zopo"
    config_block = "zopo"
    masked = True
    # the same release on every coordinate: the pruning ablation's dense reference
    dense_counterpart = DPZOSO.name


METHOD = DPZOPO()
