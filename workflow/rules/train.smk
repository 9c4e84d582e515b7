# One job per (model, task, method, eps, seed): train (except zero-shot), then evaluate the
# final iterate on the test split.


rule train:
    input:
        train=f"results/data/{{task}}/k{config['k']}-seed{{seed}}/train.jsonl",
        test=f"results/data/{{task}}/k{config['k']}-seed{{seed}}/test.jsonl",
        ledger=rules.account.output.ledger,
        model=model_input,
        weights=model_files,
        masks=mask_files,
        # tune: {mode: public}: the grid point chosen on the public task (tuning.smk)
        public_choice=public_choice,
    output:
        metrics=f"results/runs/{RUN}/metrics.json",
        # training loss, batch sizes and clipped fractions: measured on private batches, not
        # covered by the guarantee, so never in metrics.json (see report.private_diagnostics)
        diagnostics=f"results/runs/{RUN}/private_diagnostics.json",
    log:
        f"logs/train/{RUN}.log",
    benchmark:
        f"benchmarks/train/{RUN}.tsv"
    # a privately tuned method's cells are the selection's (tuning.smk)
    wildcard_constraints:
        method=TRAINED_METHOD,
    conda:
        "../../envs/dpzo.yaml"
    # `threads` per rank; a model with `ranks` > 1 trains its zeroth-order cells on that many
    # processes (torchrun here, srun in a SLURM job: one task per rank)
    threads: train_threads
    resources:
        gpu=train_gpus,
        tasks=slurm_tasks,
        cpus_per_task=config["threads"],
    params:
        model_path=model_path,
        model_cfg=model_cfg,
        method_params=method_params,
        # what the ledger is verified against before any step (its identity and its noise)
        delta=config["delta"],
        accountant=config["accountant"],
        convention=config["accounting"],
        noise=cell_noise_source,
        eval_batch_size=config["eval_batch_size"],
        device=config["device"],
        # float32 matmuls on CUDA in TF32: changes a GPU cell's numbers, so a change reruns it
        tf32=config["tf32"],
        # resumable training state of an interrupted run; not an output, so Snakemake keeps it
        # when it cleans up after a failed or killed job (deleted once metrics.json is written)
        checkpoint=f"results/checkpoints/{RUN}/train_state.pt",
    script:
        "../scripts/train.py"
