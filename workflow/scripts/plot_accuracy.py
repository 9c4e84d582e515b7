from dpzo.workflow import plot

plot(snakemake)  # noqa: F821 (injected by Snakemake)
