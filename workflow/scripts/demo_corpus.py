from dpzo.workflow import demo_corpus

demo_corpus(snakemake)  # noqa: F821 (injected by Snakemake)
