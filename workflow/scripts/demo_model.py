from dpzo.workflow import demo_model

demo_model(snakemake)  # noqa: F821 (injected by Snakemake)
