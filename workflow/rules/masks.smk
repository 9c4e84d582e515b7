# Data-free DP-ZOPO masks, computed once per (model, task label words, scorer, selection, scope,
# mode, seed, ratio) and shared by every cell that uses them: changing a training
# hyperparameter never recomputes a mask.


rule mask:
    input:
        model=model_input,
    output:
        mask=MASK,
    log:
        "logs/mask/{model}/{task}/{scorer}-{selection}-{scope}-{mode}-seed{mseed}-r{ratio}.log",
    benchmark:
        "benchmarks/mask/{model}/{task}/{scorer}-{selection}-{scope}-{mode}-seed{mseed}-r{ratio}.tsv"
    conda:
        "../../envs/dpzo.yaml"
    threads: config["threads"]
    resources:
        gpu=cuda_gpus,
    params:
        model_path=model_path,
        model_cfg=model_cfg,
        device=config["device"],
    script:
        "../scripts/mask.py"


# How much of the exact SynFlow ranking the paper's zeroth-order estimate recovers on each
# model (Spearman over all coordinates, top-k overlap): built whenever a config uses masks.
rule synflow_agreement:
    input:
        model=model_input,
    output:
        agreement="results/masks/{model}/{task}/synflow-agreement.json",
    log:
        "logs/mask/{model}/{task}/synflow-agreement.log",
    benchmark:
        "benchmarks/mask/{model}/{task}/synflow-agreement.tsv"
    conda:
        "../../envs/dpzo.yaml"
    threads: config["threads"]
    params:
        model_path=model_path,
        model_cfg=model_cfg,
        device=config["device"],
    script:
        "../scripts/synflow_agreement.py"


rule synflow_agreement_table:
    input:
        agreement=agreement_files(),
    output:
        table="results/tables/synflow_agreement.csv",
    log:
        "logs/report/synflow_agreement.log",
    conda:
        "../../envs/dpzo.yaml"
    script:
        "../scripts/agreement_table.py"
