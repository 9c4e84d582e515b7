from dpzo.pipeline.workflow import synflow_agreement, run_job

run_job(synflow_agreement, snakemake)  # noqa: F821 (injected by Snakemake)
