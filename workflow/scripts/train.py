from dpzo.pipeline.workflow import train, run_job

run_job(train, snakemake)  # noqa: F821 (injected by Snakemake)
