from dpzo.workflow import accuracy_table

accuracy_table(snakemake)  # noqa: F821 (injected by Snakemake)
