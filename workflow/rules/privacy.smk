# The privacy ledger of a cell: sigma calibrated for (n, q, T * P, eps, delta) before training.


rule account:
    input:
        train=f"results/data/{{task}}/k{config['k']}-seed{{seed}}/train.jsonl",
        # tune: {mode: public}: the point chosen on the public task is what this cell accounts
        public_choice=public_choice,
    output:
        ledger=f"results/runs/{RUN}/privacy.json",
    log:
        f"logs/account/{RUN}.log",
    conda:
        "../../envs/dpzo.yaml"
    params:
        method_params=method_params,
        delta=config["delta"],
        accountant=config["accountant"],
        convention=config["accounting"],
        # secure or test-only noise: part of the cell's identity (a secure run recomputes cells
        # made with test noise)
        noise=cell_noise_source,
        # sigma and the achieved epsilons, shared by every cell with the same (eps, delta, q,
        # T*P, accountant): a grid's ledgers need only a few calibrations
        calibrations="results/privacy/calibrations",
    script:
        "../scripts/account.py"
