from dpzo.pipeline.workflow import agreement_table, run_job

run_job(agreement_table, snakemake)  # noqa: F821 (injected by Snakemake)
