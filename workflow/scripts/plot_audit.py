from dpzo.pipeline.workflow import plot_audit, run_job

run_job(plot_audit, snakemake)  # noqa: F821 (injected by Snakemake)
