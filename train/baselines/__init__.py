"""The baselines ALTER is compared with: GradAscent, GradDiff and NPO (open-unlearning's
definitions), on a PEFT LoRA of the same rank or on every parameter.

    baseline_steps  one optimizer step of each method, and the frozen NPO reference
"""
