from dpzo.pipeline.workflow import figure, run_job

run_job(figure, snakemake)  # noqa: F821 (injected by Snakemake)
