from dpzo.workflow import agreement_table

agreement_table(snakemake)  # noqa: F821 (injected by Snakemake)
