from dpzo.pipeline.workflow import run_job, synflow_agreement

run_job(synflow_agreement, snakemake)  # noqa: F821 (injected by Snakemake)
