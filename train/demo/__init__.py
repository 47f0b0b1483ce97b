"""The demo that `make serve` shows: a tiny base model, an ALTER bundle trained on it, and the assets file.

    demo_model      a tiny Llama trained from scratch to memorise synthetic TOFU-format authors
    demo_bundle     ALTER trained on it (configs/demo.yaml), cached by a hash of every input
    demo_assets     the file naming both, with example questions for the server banner and the README
"""
