"""Privacy: accountants, calibration, the secret RNG, the noise mechanisms, the ledger and its checks, the empirical audit."""
