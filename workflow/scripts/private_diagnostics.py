from dpzo.pipeline.workflow import private_diagnostics, run_job

run_job(private_diagnostics, snakemake)  # noqa: F821 (injected by Snakemake)
