"""Evaluation: the TOFU metrics of a model, a view of an ALTER bundle, or a served endpoint.

    tofu_metrics    the metric formulas on plain numbers (open-unlearning's definitions)
    scorers         what an evaluation asks of a model: a local PyTorch model or an OpenAI-compatible endpoint
    tofu_eval       every metric on the forget / retain / real-authors / world-facts sets, the isolation matrix
    eval_sets       those sets, from a TOFU folder or synthetic TOFU-format data
    bundle_views    a bundle's view names (original, retain, heads, calibrated:, routed) as local scorers
    eval_reports    the reports on disk: JSON, Markdown, PNG
    probe           the arms of a live A/B experiment, scored through the server and stored with it
"""
