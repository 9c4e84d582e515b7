# One job per (model, task, method, eps, seed): train (except zero-shot), then evaluate the
# final iterate on the test split.


rule train:
    input:
        train=f"results/data/{{task}}/k{config['k']}-seed{{seed}}/train.jsonl",
        test=f"results/data/{{task}}/k{config['k']}-seed{{seed}}/test.jsonl",
        ledger=rules.account.output.ledger,
        model=model_input,
        masks=mask_files,
    output:
        metrics=f"results/runs/{RUN}/metrics.json",
    params:
        model_path=model_path,
        model_cfg=model_cfg,
        method_params=method_params,
        eval_batch_size=config["eval_batch_size"],
        device=config["device"],
        # resumable training state of an interrupted run; not an output, so Snakemake keeps it
        # when it cleans up after a failed or killed job (deleted once metrics.json is written)
        checkpoint=f"results/checkpoints/{RUN}/train_state.pt",
    threads: config["threads"]
    resources:
        gpu=cuda_gpus,
    log:
        f"logs/train/{RUN}.log",
    benchmark:
        f"benchmarks/train/{RUN}.tsv"
    conda:
        "../../envs/dpzo.yaml"
    script:
        "../scripts/train.py"
