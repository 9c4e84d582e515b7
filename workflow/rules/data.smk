# Train/dev/test sampling, cached per (task, k, data seed): LM-BFF k-shot, or MeZO's
# protocol for the Hugging Face tasks (mezo-*, which ignore k).


rule fewshot:
    input:
        task_files,
    output:
        train="results/data/{task}/k{k}-seed{seed}/train.jsonl",
        dev="results/data/{task}/k{k}-seed{seed}/dev.jsonl",
        test="results/data/{task}/k{k}-seed{seed}/test.jsonl",
    log:
        "logs/fewshot/{task}/k{k}-seed{seed}.log",
    conda:
        "../../envs/dpzo.yaml"
    params:
        data_dir=task_data_dir,
        max_test=config["max_test"],
        hf_datasets=config["hf_datasets"],
    script:
        "../scripts/fewshot.py"
