# Few-shot sampling (LM-BFF protocol), cached per (task, k, data seed).


rule fewshot:
    input:
        task_files,
    output:
        train="results/data/{task}/k{k}-seed{seed}/train.jsonl",
        dev="results/data/{task}/k{k}-seed{seed}/dev.jsonl",
        test="results/data/{task}/k{k}-seed{seed}/test.jsonl",
    params:
        data_dir=task_data_dir,
        max_test=config["max_test"],
    log:
        "logs/fewshot/{task}/k{k}-seed{seed}.log",
    conda:
        "../../envs/dpzo.yaml"
    script:
        "../scripts/fewshot.py"
