from dpzo.pipeline.workflow import run_job, tune_public_choice

run_job(tune_public_choice, snakemake)  # noqa: F821 (injected by Snakemake)
