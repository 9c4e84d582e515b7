from dpzo.pipeline.workflow import run_job, tune_select

run_job(tune_select, snakemake)  # noqa: F821 (injected by Snakemake)
