from dpzo.workflow import privacy_table

privacy_table(snakemake)  # noqa: F821 (injected by Snakemake)
