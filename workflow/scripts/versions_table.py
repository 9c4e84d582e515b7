from dpzo.pipeline.workflow import run_job, versions_table

run_job(versions_table, snakemake)  # noqa: F821 (injected by Snakemake)
