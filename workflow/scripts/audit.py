from dpzo.workflow import audit

audit(snakemake)  # noqa: F821 (injected by Snakemake)
