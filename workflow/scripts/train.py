from dpzo.pipeline.workflow import run_job, train

run_job(train, snakemake)  # noqa: F821 (injected by Snakemake)
