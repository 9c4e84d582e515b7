from dpzo.pipeline.workflow import demo_corpus, run_job

run_job(demo_corpus, snakemake)  # noqa: F821 (injected by Snakemake)
