from dpzo.pipeline.workflow import run_job, tune_draw

run_job(tune_draw, snakemake)  # noqa: F821 (injected by Snakemake)
