from dpzo.workflow import plot_audit

plot_audit(snakemake)  # noqa: F821 (injected by Snakemake)
