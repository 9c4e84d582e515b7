# The embedded offline demo: a generated corpus, tasks in the LM-BFF layout, and tiny models
# pretrained on the corpus and saved with save_pretrained (loaded later like real checkpoints).


rule demo_corpus:
    output:
        corpus=f"{DEMO_DIR}/corpus.txt",
    log:
        "logs/demo/corpus.log",
    conda:
        "../../envs/dpzo.yaml"
    params:
        seed=config["demo"]["seed"],
    script:
        "../scripts/demo_corpus.py"


rule demo_data:
    input:
        corpus=rules.demo_corpus.output.corpus,
    output:
        demo_task_files(),
    log:
        "logs/demo/data.log",
    conda:
        "../../envs/dpzo.yaml"
    params:
        tasks=[name for name, spec in TASKS.items() if spec.demo],
        seed=config["demo"]["task_seed"],
    script:
        "../scripts/demo_data.py"


rule demo_model:
    input:
        corpus=rules.demo_corpus.output.corpus,
    output:
        model_dir=directory(f"{DEMO_DIR}/models/{{model}}"),
    log:
        "logs/demo/model_{model}.log",
    benchmark:
        "benchmarks/demo/model_{model}.tsv"
    # every model job waits for this one: start the models first, not after the cheap jobs
    priority: 10
    conda:
        "../../envs/dpzo.yaml"
    threads: 1
    params:
        arch=demo_arch,
        seed=config["demo"]["seed"],
        steps=config["demo"]["pretrain_steps"],
    script:
        "../scripts/demo_model.py"
