"""The ALTER method: asymmetric LoRA with token-entropy-guided unlearning.

    modeling        AsymLoRA layers (shared A, retain head B_r, forget heads B_d), views, bundle I/O
    entropy         Tsallis entropy of the frozen base model, the high/low token split
    head_init       data-driven initialisation of the heads before Phase I
    alter_steps     Phase I and Phase II, one optimizer step at a time (the sequential reference)
    fused_step      Phase II with every head in one forward and one backward
    router          the entropy-aware router of the paper's per-token inference
    calibration     the forget-head weight ω(n) of a served view of n heads
"""
