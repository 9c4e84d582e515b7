# Private hyperparameter selection (a method with tune: {mode: private}; docs/tuning.md): the
# cell's ledger accounts the whole selection; the draw picks the number of candidate runs and
# their grid points (secret); each candidate is a job of its own (cached, resumable, submitted
# like any cell); the selection reads their records and publishes the best as the cell's result.


checkpoint tune_draw:
    input:
        ledger=rules.account.output.ledger,
    output:
        draws=f"results/tuning/{RUN}/draws.json",
    log:
        f"logs/tune_draw/{RUN}.log",
    wildcard_constraints:
        method=TUNED_METHOD,
    conda:
        "../../envs/dpzo.yaml"
    params:
        method_params=method_params,
        # that the selection was drawn (not an output, so kept): a second draw is refused
        history=f"results/checkpoints/{RUN}/drawn",
    script:
        "../scripts/tune_draw.py"


use rule train as tune_candidate with:
    input:
        train=f"results/data/{{task}}/k{config['k']}-seed{{seed}}/train.jsonl",
        test=f"results/data/{{task}}/k{config['k']}-seed{{seed}}/test.jsonl",
        ledger=rules.account.output.ledger,
        draws=rules.tune_draw.output.draws,
        model=model_input,
        weights=model_files,
        masks=mask_files,
    output:
        metrics=f"results/tuning/{RUN}/cand{{cand}}/metrics.json",
        diagnostics=f"results/tuning/{RUN}/cand{{cand}}/private_diagnostics.json",
    log:
        f"logs/tune_candidate/{RUN}/cand{{cand}}.log",
    benchmark:
        f"benchmarks/tune_candidate/{RUN}/cand{{cand}}.tsv"
    wildcard_constraints:
        method=TUNED_METHOD,
        cand=r"[0-9]+",
    params:
        checkpoint=f"results/checkpoints/{RUN}/cand{{cand}}/train_state.pt",


rule tune_select:
    input:
        ledger=rules.account.output.ledger,
        draws=rules.tune_draw.output.draws,
        candidates=candidate_outputs("metrics.json"),
        diagnostics=candidate_outputs("private_diagnostics.json"),
    output:
        metrics=f"results/runs/{RUN}/metrics.json",
        diagnostics=f"results/runs/{RUN}/private_diagnostics.json",
        # secret: the number of runs and every run's score (never published)
        record=f"results/tuning/{RUN}/selection.json",
    log:
        f"logs/tune_select/{RUN}.log",
    wildcard_constraints:
        method=TUNED_METHOD,
    conda:
        "../../envs/dpzo.yaml"
    script:
        "../scripts/tune_select.py"


# tune: {mode: public}: every grid point trained on the public task (in the cell's noise regime,
# each with a ledger of its own) and scored on its dev set; the best point is then trained on the
# cell's data by the train rule (input public_choice). Nothing private is read.
use rule account as tune_public_account with:
    input:
        train=public_split("train"),
    output:
        ledger=f"results/tuning/{RUN}/public/point{{point}}/privacy.json",
    log:
        f"logs/tune_public_account/{RUN}/point{{point}}.log",
    wildcard_constraints:
        method=PUBLIC_METHOD,
        point=r"[0-9]+",
    params:
        public_point=lambda wildcards: int(wildcards.point),


use rule train as tune_public_candidate with:
    input:
        train=public_split("train"),
        dev=public_split("dev"),
        test=public_split("test"),
        ledger=rules.tune_public_account.output.ledger,
        model=model_input,
        weights=model_files,
        masks=mask_files,
    output:
        metrics=f"results/tuning/{RUN}/public/point{{point}}/metrics.json",
        diagnostics=f"results/tuning/{RUN}/public/point{{point}}/private_diagnostics.json",
    log:
        f"logs/tune_public_candidate/{RUN}/point{{point}}.log",
    benchmark:
        f"benchmarks/tune_public_candidate/{RUN}/point{{point}}.tsv"
    wildcard_constraints:
        method=PUBLIC_METHOD,
        point=r"[0-9]+",
    params:
        checkpoint=f"results/checkpoints/{RUN}/public/point{{point}}/train_state.pt",
        public_point=lambda wildcards: int(wildcards.point),


rule tune_public_choice:
    input:
        candidates=public_points,
    output:
        choice=f"results/tuning/{RUN}/public/choice.json",
    log:
        f"logs/tune_public_choice/{RUN}.log",
    wildcard_constraints:
        method=PUBLIC_METHOD,
    conda:
        "../../envs/dpzo.yaml"
    params:
        method_params=method_params,
    script:
        "../scripts/tune_public_choice.py"
