"""ALTER training and evaluation: produces the adapter bundles `alter_serve` serves (imports only `alter_serve.core`).

By concern:

    alter/          the ALTER method: AsymLoRA layers, entropy, head init, Phase I/II steps, router,
                    calibration, and the ALTER run
    baselines/      GA, GradDiff and NPO steps, and the baseline run
    evaluation/     TOFU metrics, scorers (local model or endpoint), evaluation sets, bundle views,
                    reports, the A/B probe
    data/           TOFU loader, synthetic TOFU-format data, prompt formats, benchmark splits
    demo/           the demo base model, its bundle and the assets `make serve` reads
    cli/            `alter-train` and its subcommands

Shared by the runs: `run` (the entry: ALTER or a baseline), `training_run` (what every run shares),
`run_config`, `run_report`, `unlearning_data` and `subdomains` (the run's records by head),
`examples`, `objectives`, `optim`, `runtime`, `checkpoint`, `answer_probability`, `files`.
Base models for the benchmarks: `finetune` (reference fine-tuning), `tofu_models` (from scratch),
`import_gguf` (a GGUF checkpoint as a Hugging Face folder).
"""
