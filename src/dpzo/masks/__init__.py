"""DP-ZOPO masks: data-free scores (SynFlow and its zeroth-order estimate, magnitude, random) and the mask settings."""
