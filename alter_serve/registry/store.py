"""`Registry`: the persistent state of alter-serve — bundles, views, tenants, grants, API keys,
experiments, feedback and the request log — as one facade over parts split by concern.

The parts are mixins over `database.Database` (the engine, its short sessions, the data
directory and the served base model); `Registry` composes them and adds nothing, so every public
call keeps the signature and behaviour it has in its part:

    database.Database                    engine, sessions, create_all, views_revision
    view_catalog.ViewCatalog             views and their composed folders
    bundle_catalog.BundleCatalog         bundles and versions; a change recomposes its views
    access.Access                        tenants, grants, limits, API keys, request_context
    experiment_catalog.ExperimentCatalog A/B experiments and the rules they must meet
    history.History                      request log, feedback, probes, experiment statistics

Mixins rather than delegation, because the parts share one state (`Database`) and one facade of
~60 calls would otherwise repeat every signature. The parts never import each other, except that
`BundleCatalog` builds on `ViewCatalog` (a bundle change recomposes its views); row lookups that
several parts need live in `rows.py`. Every public method opens its own short session and returns
frozen records (`records.py`), so callers never hold a session.
"""

from __future__ import annotations

from .access import Access
from .bundle_catalog import BundleCatalog
from .experiment_catalog import ExperimentCatalog
from .history import History


class Registry(BundleCatalog, Access, ExperimentCatalog, History):
    """The registry. Construct, call `create_all()` once, then use from any thread.

        registry = Registry("sqlite:///var/registry.db", "var/data", base_fingerprint=fp, base_shapes=shapes)
        registry.create_all()

    See `database.Database` for the constructor's arguments.
    """
