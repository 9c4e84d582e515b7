from dpzo.pipeline.workflow import summarize, run_job

run_job(summarize, snakemake)  # noqa: F821 (injected by Snakemake)
