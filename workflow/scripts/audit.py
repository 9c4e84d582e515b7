from dpzo.pipeline.workflow import audit, run_job

run_job(audit, snakemake)  # noqa: F821 (injected by Snakemake)
