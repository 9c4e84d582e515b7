from dpzo.workflow import mask

mask(snakemake)  # noqa: F821 (injected by Snakemake)
