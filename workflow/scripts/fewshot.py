from dpzo.workflow import fewshot

fewshot(snakemake)  # noqa: F821 (injected by Snakemake)
