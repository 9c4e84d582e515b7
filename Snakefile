# dpzo: differentially private zeroth-order fine-tuning of language models.
#
#   snakemake --cores 2                                  # the embedded demo (config/config.yaml)
#   snakemake --cores 2 -f results/runs/<model>/<task>/<method>/eps<eps>/seed<seed>/metrics.json
#   snakemake --cores 2 audit_all                        # the empirical privacy audit (not in `all`)
#
# DAG: demo corpus/tasks/models (demo only) -> k-shot splits -> privacy ledger per cell
#      -> training + evaluation per cell -> tables and figures beside the published values.
#
#   snakemake --report results/report.html               # after a run: the HTML report

from snakemake.utils import min_version

min_version("9.20")


# The demo config unless the command line names config files: `--configfile config/paper.yaml`
# then runs exactly that grid (list config/config.yaml first to overlay on the demo instead).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


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
    cand=r"[0-9]+",
    point=r"[0-9]+",


include: "workflow/rules/demo.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/masks.smk"
include: "workflow/rules/privacy.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/tuning.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/audit.smk"


# Seconds-long steps run on the submitting host, never through a cluster queue; on SLURM only
# the model jobs (demo_model, mask, synflow_agreement, train: one job per cell) and the audit
# are submitted.
localrules:
    all,
    demo_corpus,
    demo_data,
    fewshot,
    account,
    tune_draw,
    tune_select,
    tune_public_account,
    tune_public_choice,
    collect,
    summarize,
    accuracy_table,
    privacy_table,
    versions_table,
    figure_accuracy_bars,
    figure_memory_time,
    figure_privacy_utility,
    figure_tuning_cost,
    figure_training_curves,
    figure_ablation,
    private_diagnostics,
    figure_private_diagnostics,
    synflow_agreement_table,
    plot_audit,
    audit_all,


# Every cell's outputs are targets themselves, not only through the tables made from them: a
# cell whose metrics went missing (a killed -f run) is rebuilt by a plain run.
rule all:
    default_target: True
    input:
        all_metrics(),
        all_ledgers(),
        report_targets(),
        private_report_targets(),
        agreement_tables(),
