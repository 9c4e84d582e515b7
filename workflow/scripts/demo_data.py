from dpzo.pipeline.workflow import demo_data, run_job

run_job(demo_data, snakemake)  # noqa: F821 (injected by Snakemake)
