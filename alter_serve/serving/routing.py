"""Request routing: the one place where a request's model name becomes a lease on a vLLM LoRARequest.

    model name → (experiment arm) → view → lease on the view's current version → its LoRARequest

`Target` is the end of that path: what a request holds while it runs (the lease, and with it the
LoRARequest the engine is given), and what its response says served it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.adapters import Lease


@dataclass
class Target:
    """Where a request goes: the model name asked for, the view version, the A/B arm (the control
    arm while the experiment is `paused`), and whose prefix cache it may use."""

    model: str
    lease: Lease
    experiment: str | None = None
    arm: str | None = None
    paused: bool = False
    # The tenant's prefix-cache partition: tenants that share a view never share cached KV blocks,
    # so one cannot time another's prompts (a cache hit answers faster).
    cache_salt: str | None = None

    @property
    def view_label(self) -> str:
        return self.lease.version.label

    @property
    def fingerprint(self) -> str:
        arm = f";exp={self.experiment};arm={self.arm}{';paused' if self.paused else ''}" if self.experiment else ""
        return f"alter:{self.view_label}{arm}"

    def headers(self) -> dict[str, str]:
        headers = {"x-alter-view": self.view_label}
        if self.experiment:
            headers.update({"x-alter-experiment": self.experiment, "x-alter-arm": self.arm or "",
                            "x-alter-experiment-status": "paused" if self.paused else "running"})
        return headers

