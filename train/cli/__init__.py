"""`alter-train`, the training package's command line: `main` assembles the subcommands of the other modules.

    main            the entry point, the list of registrars, `import-smollm2`
    train_cli       `run`
    demo_cli        `demo-model`, `demo-bundle`, `demo-assets`
    eval_cli        `eval`
    probe_cli       `probe`
"""
