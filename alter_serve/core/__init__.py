"""Shared by training and serving: the adapter bundle, views and the base-model fingerprint.

Imports no web code and no vLLM, so `train` can depend on it freely.

    names        how a bundle names its files, heads, modules and tensors (standard library only)
    manifest     manifest.json: models and a strict parser
    validation   every check of a bundle's contents, problems listed rather than raised
    safe_read    bounded, link-refusing, pickle-free reading of client files
    tensors      content hash and exact fp32 views of tensors
    bundle       AlterBundle, load_bundle, validate_contents, BundleError
    views        View, compose(bundle, view) → PEFT LoRA folder
    durable      fsync of written folders before and after they are published
    fingerprint  the base-model fingerprint that binds a bundle to its base model
"""
