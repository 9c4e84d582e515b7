from dpzo.pipeline.workflow import accuracy_table, run_job

run_job(accuracy_table, snakemake)  # noqa: F821 (injected by Snakemake)
