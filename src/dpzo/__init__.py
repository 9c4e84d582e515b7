"""Differentially private zeroth-order fine-tuning of language models."""

from dpzo.provenance import __version__

__all__ = ["__version__"]
