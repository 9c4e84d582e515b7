# dpzo: differentially private zeroth-order fine-tuning of language models.
#
#   snakemake --cores 2                                  # the embedded demo (config/config.yaml)
#   snakemake --cores 2 -f results/runs/<model>/<task>/<method>/eps<eps>/seed<seed>/metrics.json
#
# DAG: demo corpus/tasks/models (demo only) -> k-shot splits -> privacy ledger per cell
#      -> training + evaluation per cell -> summary table and figure.

from snakemake.utils import min_version

min_version("9.20")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


wildcard_constraints:
    model=r"[A-Za-z0-9_.\-]+",
    task=r"[A-Za-z0-9_.\-]+",
    method=r"[a-z0-9\-]+(\+[A-Za-z0-9.\-]+)?",
    eps=r"[0-9]+(\.[0-9]+)?|inf",
    seed=r"[0-9]+",
    k=r"[0-9]+",
    scorer=r"[a-z\-]+",
    selection=r"[a-z]+",
    scope=r"[a-z\-]+",
    mode=r"[a-z]+",
    mseed=r"[0-9]+",
    ratio=r"[0-9.e\-]+",


include: "workflow/rules/demo.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/masks.smk"
include: "workflow/rules/privacy.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/report.smk"


# Seconds-long steps run on the submitting host, never through a cluster queue; on SLURM only
# demo_model, mask and train (one job per cell) are submitted.
localrules:
    all,
    demo_corpus,
    demo_data,
    fewshot,
    account,
    summarize,
    plot_accuracy,


rule all:
    input:
        "results/tables/summary.csv",
        "results/figures/accuracy.png",
        all_ledgers(),
    default_target: True
