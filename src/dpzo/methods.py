"""Method names and their privacy class (kept free of heavy imports: the Snakefile reads it)."""

ZERO_SHOT = "zero-shot"
ZO_METHODS = ("mezo", "dp-zoso")
PRIVATE_METHODS = ("dp-zoso",)
METHODS = (ZERO_SHOT, *ZO_METHODS)


def is_private(method: str) -> bool:
    """Private methods run at every configured epsilon; the others only at eps = inf."""
    return method in PRIVATE_METHODS
