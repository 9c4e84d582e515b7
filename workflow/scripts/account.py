from dpzo.pipeline.workflow import account, run_job

run_job(account, snakemake)  # noqa: F821 (injected by Snakemake)
