from dpzo.pipeline.workflow import run_job, summarize

run_job(summarize, snakemake)  # noqa: F821 (injected by Snakemake)
