# Data-free DP-ZOPO masks, computed once per (model, task label words, scorer, selection, scope,
# mode, seed, ratio) and shared by every cell that uses them: changing a training
# hyperparameter never recomputes a mask.


rule mask:
    input:
        model=model_input,
    output:
        mask=MASK,
    params:
        model_path=model_path,
        model_cfg=model_cfg,
        device=config["device"],
    threads: config["threads"]
    resources:
        gpu=cuda_gpus,
    log:
        "logs/mask/{model}/{task}/{scorer}-{selection}-{scope}-{mode}-seed{mseed}-r{ratio}.log",
    benchmark:
        "benchmarks/mask/{model}/{task}/{scorer}-{selection}-{scope}-{mode}-seed{mseed}-r{ratio}.tsv"
    conda:
        "../../envs/dpzo.yaml"
    script:
        "../scripts/mask.py"
