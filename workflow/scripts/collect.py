from dpzo.pipeline.workflow import collect, run_job

run_job(collect, snakemake)  # noqa: F821 (injected by Snakemake)
