from dpzo.workflow import collect

collect(snakemake)  # noqa: F821 (injected by Snakemake)
