from dpzo.pipeline.workflow import mask, run_job

run_job(mask, snakemake)  # noqa: F821 (injected by Snakemake)
