"""The constants that define z's stream: Philox4x32-10 (Salmon et al. 2011) on the counter of a
coordinate, and the first Box-Muller normal of its first two words, as Triton's ``tl.randn``
computes it.  Shared by the torch emulation (``dpzo.zo.philox``) and the compiled CPU passes
(``dpzo.zo.cpu_kernels``), which must draw the same integers."""

MASK32 = 0xFFFFFFFF
# Philox4x32 constants (Salmon et al. 2011; Triton's philox_impl)
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # 2**-31, Triton's uint_to_uniform_float for 32-bit draws
TWO_PI = 6.283185307179586
MIN_UNIFORM = 1.0e-7
