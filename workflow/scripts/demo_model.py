from dpzo.pipeline.workflow import demo_model, run_job

run_job(demo_model, snakemake)  # noqa: F821 (injected by Snakemake)
