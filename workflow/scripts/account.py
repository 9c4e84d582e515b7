from dpzo.workflow import account

account(snakemake)  # noqa: F821 (injected by Snakemake)
