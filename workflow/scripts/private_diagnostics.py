from dpzo.workflow import private_diagnostics

private_diagnostics(snakemake)  # noqa: F821 (injected by Snakemake)
