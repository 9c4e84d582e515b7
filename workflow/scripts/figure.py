from dpzo.workflow import figure

figure(snakemake)  # noqa: F821 (injected by Snakemake)
