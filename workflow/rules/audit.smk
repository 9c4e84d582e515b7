# The empirical privacy audit: a measured lower bound on epsilon for one cell's release
# sequence, at each epsilon of `audit.epsilons` ("inf": the same release without noise).
# Not part of `all`: run it with `snakemake --cores 2 audit_all`.


rule audit:
    input:
        ledger=f"results/runs/{{model}}/{{task}}/{{method}}/eps{{eps}}/seed{config['seeds'][0]}/privacy.json",
    output:
        audit=AUDIT,
    log:
        "logs/audit/{model}/{task}/{method}/eps{eps}.log",
    benchmark:
        "benchmarks/audit/{model}/{task}/{method}/eps{eps}.tsv"
    conda:
        "../../envs/dpzo.yaml"
    threads: 1
    params:
        trials=audit_cfg("trials"),
        confidence=audit_cfg("confidence"),
    script:
        "../scripts/audit.py"


rule plot_audit:
    input:
        audits=all_audits,
    output:
        figure="results/audit/audit.png",
    log:
        "logs/audit/plot.log",
    conda:
        "../../envs/dpzo.yaml"
    script:
        "../scripts/plot_audit.py"


rule audit_all:
    input:
        all_audits,
        rules.plot_audit.output.figure,
