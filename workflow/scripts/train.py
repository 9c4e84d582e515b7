from dpzo.workflow import train

train(snakemake)  # noqa: F821 (injected by Snakemake)
