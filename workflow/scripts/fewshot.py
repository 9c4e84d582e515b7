from dpzo.pipeline.workflow import fewshot, run_job

run_job(fewshot, snakemake)  # noqa: F821 (injected by Snakemake)
