from dpzo.workflow import demo_data

demo_data(snakemake)  # noqa: F821 (injected by Snakemake)
