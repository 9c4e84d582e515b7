# Aggregation: mean +- std over seeds, and accuracy against epsilon.


rule summarize:
    input:
        metrics=all_metrics(),
    output:
        summary="results/tables/summary.csv",
    log:
        "logs/report/summarize.log",
    conda:
        "../../envs/dpzo.yaml"
    script:
        "../scripts/summarize.py"


rule plot_accuracy:
    input:
        summary=rules.summarize.output.summary,
    output:
        figure="results/figures/accuracy.png",
    log:
        "logs/report/plot_accuracy.log",
    conda:
        "../../envs/dpzo.yaml"
    script:
        "../scripts/plot_accuracy.py"
