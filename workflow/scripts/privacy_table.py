from dpzo.pipeline.workflow import privacy_table, run_job

run_job(privacy_table, snakemake)  # noqa: F821 (injected by Snakemake)
