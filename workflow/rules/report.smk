# Aggregation and the report: every cell read once (collect), mean +- std over seeds
# (summarize), the tables beside the published values and the figures. All cheap: they rerun
# whenever a cell changes. `snakemake --report results/report.html` gathers the report() items.


rule collect:
    input:
        metrics=all_metrics(),
        ledgers=all_ledgers(),
    output:
        cells=report(
            "results/tables/cells.csv",
            caption="../report/cells.rst",
            category="Data",
        ),
        curves="results/tables/curves.csv",
    log:
        "logs/report/collect.log",
    conda:
        "../../envs/dpzo.yaml"
    params:
        models=config["models"],
        methods=config["methods"],
        benchmarks=all_benchmarks(),
    script:
        "../scripts/collect.py"


rule summarize:
    input:
        cells=rules.collect.output.cells,
    output:
        summary=report(
            "results/tables/summary.csv",
            caption="../report/summary.rst",
            category="Data",
        ),
    log:
        "logs/report/summarize.log",
    conda:
        "../../envs/dpzo.yaml"
    script:
        "../scripts/summarize.py"


rule accuracy_table:
    input:
        summary=rules.summarize.output.summary,
        reference=REFERENCE_ACCURACY,
    output:
        csv="results/tables/accuracy-eps{eps}.csv",
        md="results/tables/accuracy-eps{eps}.md",
        tex="results/tables/accuracy-eps{eps}.tex",
        html=report(
            "results/tables/accuracy-eps{eps}.html",
            caption="../report/accuracy_table.rst",
            category="Tables",
            labels={"table": "accuracy", "epsilon": "{eps}"},
        ),
    log:
        "logs/report/accuracy_table-eps{eps}.log",
    conda:
        "../../envs/dpzo.yaml"
    params:
        delta=config["delta"],
    script:
        "../scripts/accuracy_table.py"


rule privacy_table:
    input:
        cells=rules.collect.output.cells,
    output:
        csv="results/tables/privacy.csv",
        md="results/tables/privacy.md",
        tex="results/tables/privacy.tex",
        html=report(
            "results/tables/privacy.html",
            caption="../report/privacy_table.rst",
            category="Tables",
            labels={"table": "privacy", "epsilon": "all"},
        ),
    log:
        "logs/report/privacy_table.log",
    conda:
        "../../envs/dpzo.yaml"
    script:
        "../scripts/privacy_table.py"


# dpzo (and its commit), Python, the libraries and the device behind each cell, per combination.
rule versions_table:
    input:
        cells=rules.collect.output.cells,
    output:
        csv="results/tables/versions.csv",
        md="results/tables/versions.md",
        tex="results/tables/versions.tex",
        html=report(
            "results/tables/versions.html",
            caption="../report/versions_table.rst",
            category="Tables",
            labels={"table": "versions", "epsilon": "all"},
        ),
    log:
        "logs/report/versions_table.log",
    conda:
        "../../envs/dpzo.yaml"
    script:
        "../scripts/versions_table.py"


rule figure_accuracy_bars:
    input:
        summary=rules.summarize.output.summary,
        reference=REFERENCE_ACCURACY,
    output:
        png=report(
            "results/figures/accuracy-bars.png",
            caption="../report/accuracy_bars.rst",
            category="Figures",
            labels={"figure": "1 accuracy bars"},
        ),
        pdf="results/figures/accuracy-bars.pdf",
    log:
        "logs/report/figure_accuracy_bars.log",
    conda:
        "../../envs/dpzo.yaml"
    params:
        figure="accuracy_bars",
    script:
        "../scripts/figure.py"


rule figure_memory_time:
    input:
        summary=rules.summarize.output.summary,
        reference=REFERENCE_MEMORY,
    output:
        png=report(
            "results/figures/memory-time.png",
            caption="../report/memory_time.rst",
            category="Figures",
            labels={"figure": "2 memory and time"},
        ),
        pdf="results/figures/memory-time.pdf",
    log:
        "logs/report/figure_memory_time.log",
    conda:
        "../../envs/dpzo.yaml"
    params:
        figure="memory_time",
    script:
        "../scripts/figure.py"


rule figure_privacy_utility:
    input:
        summary=rules.summarize.output.summary,
        reference=REFERENCE_ACCURACY,
    output:
        png=report(
            "results/figures/privacy-utility.png",
            caption="../report/privacy_utility.rst",
            category="Figures",
            labels={"figure": "3 privacy-utility"},
        ),
        pdf="results/figures/privacy-utility.pdf",
    log:
        "logs/report/figure_privacy_utility.log",
    conda:
        "../../envs/dpzo.yaml"
    params:
        figure="privacy_utility",
    script:
        "../scripts/figure.py"


rule figure_tuning_cost:
    input:
        summary=rules.summarize.output.summary,
    output:
        png=report(
            "results/figures/tuning-cost.png",
            caption="../report/tuning_cost.rst",
            category="Figures",
            labels={"figure": "6 tuning cost"},
        ),
        pdf="results/figures/tuning-cost.pdf",
    log:
        "logs/report/figure_tuning_cost.log",
    conda:
        "../../envs/dpzo.yaml"
    params:
        figure="tuning_cost",
    script:
        "../scripts/figure.py"


rule figure_training_curves:
    input:
        curves=rules.collect.output.curves,
        cells=rules.collect.output.cells,
    output:
        png=report(
            "results/figures/training-curves.png",
            caption="../report/training_curves.rst",
            category="Figures",
            labels={"figure": "4 training curves"},
        ),
        pdf="results/figures/training-curves.pdf",
    log:
        "logs/report/figure_training_curves.log",
    conda:
        "../../envs/dpzo.yaml"
    params:
        figure="training_curves",
    script:
        "../scripts/figure.py"


# Only when `report.private_diagnostics` is true: what the trainers measured on the private
# batches (training loss, realised batch sizes, clipped fractions), not covered by the guarantee.
rule private_diagnostics:
    input:
        diagnostics=all_diagnostics(),
    output:
        table=report(
            "results/private/diagnostics.csv",
            caption="../report/private_diagnostics.rst",
            category="Private diagnostics (not covered by the guarantee)",
        ),
    log:
        "logs/report/private_diagnostics.log",
    conda:
        "../../envs/dpzo.yaml"
    script:
        "../scripts/private_diagnostics.py"


rule figure_private_diagnostics:
    input:
        curves=rules.private_diagnostics.output.table,
        cells=rules.collect.output.cells,
    output:
        png=report(
            "results/private/training-loss.png",
            caption="../report/private_training_loss.rst",
            category="Private diagnostics (not covered by the guarantee)",
        ),
        pdf="results/private/training-loss.pdf",
    log:
        "logs/report/figure_private_training_loss.log",
    conda:
        "../../envs/dpzo.yaml"
    params:
        figure="private_training_loss",
    script:
        "../scripts/figure.py"


rule figure_ablation:
    input:
        summary=rules.summarize.output.summary,
    output:
        png=report(
            "results/figures/ablation.png",
            caption="../report/ablation.rst",
            category="Figures",
            labels={"figure": "5 pruning ablation"},
        ),
        pdf="results/figures/ablation.pdf",
    log:
        "logs/report/figure_ablation.log",
    conda:
        "../../envs/dpzo.yaml"
    params:
        figure="ablation",
    script:
        "../scripts/figure.py"
