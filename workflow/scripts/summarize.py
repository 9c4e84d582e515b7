from dpzo.workflow import summarize

summarize(snakemake)  # noqa: F821 (injected by Snakemake)
