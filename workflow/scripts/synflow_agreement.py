from dpzo.workflow import synflow_agreement

synflow_agreement(snakemake)  # noqa: F821 (injected by Snakemake)
