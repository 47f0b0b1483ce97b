"""`alter-serve tenants|keys|views|experiments|bundles|gc ...`: the admin API of a running server, from
the shell. Every command is one or two HTTP calls (httpx) to `/admin/...`; nothing touches the
database directly, so the commands work against any replica, local or remote.

    export ALTER_SERVE_URL=http://127.0.0.1:8000 ALTER_SERVE_ADMIN_KEY=as-...
    alter-serve tenants create acme --view original --view no-bio --default-view original --max-concurrent 8
    alter-serve keys create acme --expires-in 90d
    alter-serve keys create --admin
    alter-serve experiments create bio-ab --alias chat --tenant acme --arm control=original --arm forget=no-bio:1
    alter-serve experiments results bio-ab
    alter-serve tenants list --json
    alter-serve gc --dry-run

Output is a table (or `--json`). A refused call prints the server's own error message (the OpenAI
error body's `message`) and exits 1; a usage mistake exits 2. Names given on the command line go
into URL paths escaped (`admin_path`), so a name can never reach another route.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:  # httpx is imported when a command runs, so `alter-serve serve` never needs it
    import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV, KEY_ENV = "ALTER_SERVE_URL", "ALTER_SERVE_ADMIN_KEY"
UNLIMITED = ("none", "unlimited")
LIMIT_FIELDS = ("max_concurrent", "tokens_per_minute", "max_tokens_cap")
_UNSET = object()  # a limit flag not given (None means "set to unlimited")


class AdminError(Exception):
    """A refused or failed admin call; `message` is what the user should read."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


# ---- HTTP ---------------------------------------------------------------------------------------------


def admin_path(*segments: object) -> str:
    """`/admin/<segment>/...` with every segment escaped as one path segment: '/', '?', '#', '%' and
    the like percent-encoded (`quote(safe="")`), and a segment '.' or '..' spelled with %2E, which
    HTTP clients and proxies would otherwise resolve as a step up the path."""
    escaped = [quote(str(segment), safe="") for segment in segments]
    return "/admin/" + "/".join(e.replace(".", "%2E") if e in (".", "..") else e for e in escaped)


class AdminClient:
    """The admin API over HTTP: one `request` that returns the JSON body or raises AdminError."""

    def __init__(self, url: str, admin_key: str, timeout_s: float = 60.0, transport: httpx.BaseTransport | None = None):
        import httpx

        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, transport=transport,
                                  headers={"Authorization": f"Bearer {admin_key}"})

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise AdminError(f"the server at {self.url} did not answer in time ({exc.__class__.__name__}); "
                             "retry, or raise --timeout") from exc
        except httpx.TransportError as exc:
            raise AdminError(f"cannot reach the server at {self.url} ({exc}); is it running? "
                             f"Pass --url or set {URL_ENV}") from exc
        if not response.is_success:
            raise AdminError(_error_message(response))
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("content-type") or "no content type"
            raise AdminError(f"the server at {self.url} answered {method} {path} with HTTP {response.status_code} "
                             f"but not with JSON ({kind}); is {self.url} an alter-serve server? Pass --url or set "
                             f"{URL_ENV}") from None

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def close(self) -> None:
        self._http.close()


def _error_message(response: httpx.Response) -> str:
    """The server's OpenAI-format error message, with the status and code."""
    try:
        error = response.json()["error"]
        message, code = error["message"], error.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = response.text.strip()[:500] or response.reason_phrase, None
    return f"{message} (HTTP {response.status_code}{', ' + code if code else ''})"


# ---- output -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """What a command shows: `data` (printed as JSON with --json), and how to print it as a table:
    `rows` with `columns` (a list), or None to print `data` as field/value pairs."""

    data: Any
    columns: Sequence[str] | None = None
    rows: Sequence[Sequence[Any]] | None = None
    note: str | None = None


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned text table."""
    cells = [list(columns)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(output: Output, as_json: bool) -> str:
    if as_json:
        return json.dumps(output.data, indent=2, sort_keys=False)
    if output.columns is not None:
        text = format_table(output.columns, output.rows or []) if output.rows else "(none)"
    else:
        fields = output.data if isinstance(output.data, Mapping) else {"result": output.data}
        text = format_table(["field", "value"], list(fields.items()))
    return text + (f"\n{output.note}" if output.note else "")


# ---- argument parsing helpers ---------------------------------------------------------------------------


def _limit_value(text: str) -> int | None:
    """A limit: a positive integer, or 'none' / 'unlimited'."""
    if text.lower() in UNLIMITED:
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer or 'none'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1 (use 'none' for no limit)")
    return value


def _head_weight(text: str) -> tuple[str, float]:
    """HEAD=WEIGHT (weight 1 when omitted)."""
    head, _, weight = text.partition("=")
    try:
        return head, float(weight) if weight else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HEAD=WEIGHT, e.g. bio=1.0") from None


def _arm(text: str) -> dict[str, Any]:
    """NAME=VIEW[:WEIGHT] (weight 1 when omitted)."""
    name, sep, rest = text.partition("=")
    view, _, weight = rest.partition(":")
    if not (name and sep and view):
        raise argparse.ArgumentTypeError(f"{text!r}: expected ARM=VIEW[:WEIGHT], e.g. control=original:1")
    try:
        return {"name": name, "view": view, "weight": float(weight) if weight else 1.0}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the weight after ':' must be a number") from None


def _connection_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server")
    group.add_argument("--url", default=None, help=f"server root URL (default: ${URL_ENV}, else {DEFAULT_URL})")
    group.add_argument("--admin-key", default=None, help=f"admin API key (default: ${KEY_ENV})")
    group.add_argument("--json", action="store_true", help="print the server's JSON instead of a table")
    group.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server (default 60)")
    return common


Handler = Callable[[AdminClient, argparse.Namespace], Output]


def _command(parent: Any, name: str, handler: Handler, help: str, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = parent.add_parser(name, help=help, description=help, parents=[common])
    parser.set_defaults(func=lambda args: run_command(handler, args))
    return parser


def run_command(handler: Handler, args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    """Connect, run one handler, print its output; print the error and return non-zero on failure."""
    url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    key = args.admin_key or os.environ.get(KEY_ENV)
    if not key:
        print(f"alter-serve: error: no admin key; pass --admin-key or set {KEY_ENV}", file=sys.stderr)
        return 2
    client = AdminClient(url, key, args.timeout, transport)
    try:
        output = handler(client, args)
    except AdminError as exc:
        print(f"alter-serve: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    finally:
        client.close()
    print(render(output, args.json))
    return 0


# ---- tenants ----------------------------------------------------------------------------------------------


def _tenant_row(t: Mapping[str, Any]) -> list[Any]:
    limits = t["limits"]
    return [t["name"], ", ".join(t["views"]), t["default_view"], limits["max_concurrent"],
            limits["tokens_per_minute"], limits["max_tokens_cap"], "disabled" if t["disabled"] else "active"]


TENANT_COLUMNS = ["tenant", "views", "default", "max_concurrent", "tokens/min", "max_tokens_cap", "state"]


def tenants_list(client: AdminClient, args: argparse.Namespace) -> Output:
    data = client.get("/admin/tenants")["data"]
    return Output(data, TENANT_COLUMNS, [_tenant_row(t) for t in data])


def _find_tenant(client: AdminClient, name: str) -> dict[str, Any]:
    for tenant in client.get("/admin/tenants")["data"]:
        if tenant["name"] == name:
            return tenant
    raise AdminError(f"tenant {name!r} not found; see `alter-serve tenants list`")


def tenants_show(client: AdminClient, args: argparse.Namespace) -> Output:
    tenant = _find_tenant(client, args.name)
    return Output(tenant, TENANT_COLUMNS, [_tenant_row(tenant)])


def _given_limits(args: argparse.Namespace) -> dict[str, int | None]:
    """The limit flags given on the command line (None = 'none', unlimited)."""
    return {f: getattr(args, f) for f in LIMIT_FIELDS if getattr(args, f) is not _UNSET}


def tenants_create(client: AdminClient, args: argparse.Namespace) -> Output:
    body = {"name": args.name, "views": args.view, "default_view": args.default_view, "limits": _given_limits(args)}
    tenant = client.request("POST", "/admin/tenants", json=body)
    return Output(tenant, TENANT_COLUMNS, [_tenant_row(tenant)],
                  note=f"create a key for it: alter-serve keys create {args.name}")


def tenants_update(client: AdminClient, args: argparse.Namespace) -> Output:
    body: dict[str, Any] = {"grant": args.grant, "revoke": args.revoke}
    if args.default_view is not None:
        body["default_view"] = args.default_view
    given = _given_limits(args)
    if given:  # the API replaces all limits: keep the ones not named on the command line
        body["limits"] = {**_find_tenant(client, args.name)["limits"], **given}
    if args.disabled is not None:
        body["disabled"] = args.disabled
    tenant = client.request("PATCH", admin_path("tenants", args.name), json=body)
    return Output(tenant, TENANT_COLUMNS, [_tenant_row(tenant)])


def tenants_delete(client: AdminClient, args: argparse.Namespace) -> Output:
    return Output(client.request("DELETE", admin_path("tenants", args.name)))


# ---- keys -----------------------------------------------------------------------------------------------------


def keys_list(client: AdminClient, args: argparse.Namespace) -> Output:
    data = client.get("/admin/keys", params={"tenant": args.tenant} if args.tenant else None)["data"]
    rows = [[k["id"], k["tenant"], k["role"], k["prefix"] + "…", k["created_at"], k.get("expires_at") or "never",
             _key_state(k)] for k in data]
    return Output(data, ["id", "tenant", "role", "prefix", "created", "expires", "state"], rows)


def _key_state(key: Mapping[str, Any]) -> str:
    if key["revoked_at"]:
        return "revoked " + key["revoked_at"]
    expires = key.get("expires_at")
    if expires and datetime.fromisoformat(expires) <= datetime.now(timezone.utc):
        return "expired"
    return "active"


def keys_create(client: AdminClient, args: argparse.Namespace) -> Output:
    if args.admin == (args.tenant is not None):
        raise AdminError("name a tenant for a tenant key, or pass --admin (and no tenant) for an admin key", 2)
    body = {"role": "admin" if args.admin else "tenant", "tenant": args.tenant, "expires_at": args.expires_at}
    created = client.request("POST", "/admin/keys", json=body)
    return Output(created, note="Store this key now; it is not shown again.")


_DURATION = re.compile(r"(?P<n>\d+)(?P<unit>[smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _expiry(text: str) -> str:
    """`--expires-in 90d` (s, m, h or d) or `--expires-at` an ISO time with a zone → RFC 3339 UTC."""
    match = _DURATION.fullmatch(text)
    if match:
        when = datetime.now(timezone.utc) + timedelta(seconds=int(match["n"]) * _UNIT_S[match["unit"]])
        return when.isoformat()
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration (90d, 12h, 30m, 3600s) or an ISO time") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r}: give a time zone, e.g. 2027-01-31T00:00:00Z")
    return when.isoformat()


def keys_revoke(client: AdminClient, args: argparse.Namespace) -> Output:
    return Output(client.request("DELETE", admin_path("keys", args.id)))


# ---- views ------------------------------------------------------------------------------------------------------


def _view_row(v: Mapping[str, Any]) -> list[Any]:
    spec = {"retain": v["spec"]["retain"], "forget": v["spec"]["forget"]} if v["bundle"] else "base model"
    return [v["name"], v["bundle"], spec, (v["content_hash"] or "base")[:12], "yes" if v.get("loaded") else "no"]


VIEW_COLUMNS = ["view", "bundle", "heads", "version", "loaded"]


def views_list(client: AdminClient, args: argparse.Namespace) -> Output:
    data = client.get("/admin/views")["data"]
    return Output(data, VIEW_COLUMNS, [_view_row(v) for v in data])


def views_define(client: AdminClient, args: argparse.Namespace) -> Output:
    body = {"bundle": args.bundle, "retain": args.retain, "forget": dict(args.forget), "calibrated": args.calibrated}
    result = client.request("PUT", admin_path("views", args.name), json=body)
    spec = result["view"]["spec"]  # the weights in effect (calibrated ones differ from the given)
    return Output(result, ["view", "bundle", "heads", "version (loaded as)"],
                  [[args.name, args.bundle, {"retain": spec["retain"], "forget": spec["forget"]}, result["version"]]])


def views_delete(client: AdminClient, args: argparse.Namespace) -> Output:
    return Output(client.request("DELETE", admin_path("views", args.name)))


# ---- experiments --------------------------------------------------------------------------------------------------


def _experiment_row(e: Mapping[str, Any]) -> list[Any]:
    arms = ", ".join(f"{a['name']}={a['view']}:{a['weight']:g}" for a in e["arms"])
    return [e["name"], e["alias"], e["status"], ", ".join(e["tenants"]), arms, e["control_arm"], e["sticky"]]


EXPERIMENT_COLUMNS = ["experiment", "alias", "status", "tenants", "arms (name=view:weight)", "control", "sticky"]


def experiments_list(client: AdminClient, args: argparse.Namespace) -> Output:
    data = client.get("/admin/experiments")["data"]
    return Output(data, EXPERIMENT_COLUMNS, [_experiment_row(e) for e in data])


def experiments_show(client: AdminClient, args: argparse.Namespace) -> Output:
    experiment = client.get(admin_path("experiments", args.name))
    return Output(experiment, EXPERIMENT_COLUMNS, [_experiment_row(experiment)])


def experiments_create(client: AdminClient, args: argparse.Namespace) -> Output:
    body = {"name": args.name, "alias": args.alias, "tenants": args.tenant, "arms": args.arm, "sticky": args.sticky,
            "control_arm": args.control, "status": args.status}
    experiment = client.request("POST", "/admin/experiments", json=body)
    return Output(experiment, EXPERIMENT_COLUMNS, [_experiment_row(experiment)])


def _patch_experiment(client: AdminClient, name: str, body: Mapping[str, Any]) -> Output:
    experiment = client.request("PATCH", admin_path("experiments", name), json=body)
    return Output(experiment, EXPERIMENT_COLUMNS, [_experiment_row(experiment)])


def experiments_update(client: AdminClient, args: argparse.Namespace) -> Output:
    body = {"arms": args.arm, "control_arm": args.control, "tenants": args.tenant, "status": args.status}
    body = {k: v for k, v in body.items() if v is not None}
    if not body:
        raise AdminError("nothing to change; give --arm, --control, --tenant or --status", exit_code=2)
    return _patch_experiment(client, args.name, body)


def _set_status(status: str) -> Handler:
    return lambda client, args: _patch_experiment(client, args.name, {"status": status})


def experiments_delete(client: AdminClient, args: argparse.Namespace) -> Output:
    return Output(client.request("DELETE", admin_path("experiments", args.name)))


def _p(test: Mapping[str, Any] | None) -> str:
    if not test:
        return "—"
    if test["p_value"] is None:
        return "n/a"
    return f"{test['p_value']:.3g}{' *' if test['significant'] else ''}"


def _ci(estimate: Mapping[str, Any]) -> str:
    if estimate["mean"] is None:
        return "—"
    if estimate["low"] is None:
        return f"{estimate['mean']:.3g}"
    return f"{estimate['mean']:.3g} [{estimate['low']:.3g}, {estimate['high']:.3g}]"


def _probe_cell(probe: Mapping[str, Any] | None, metric: str) -> str:
    if not probe or probe["metrics"].get(metric) is None:
        return "—"
    return f"{probe['metrics'][metric]:.3g}{' (stale)' if probe['stale'] else ''}"


RESULT_COLUMNS = ["arm", "view", "requests", "errors", "error rate [CI]", "p50 ms", "p95 ms", "ttft p50 ms",
                  "tokens in/out", "feedback [CI]", "n", "p feedback", "p errors", "forget p", "retain p"]


def experiments_results(client: AdminClient, args: argparse.Namespace) -> Output:
    report = client.get(admin_path("experiments", args.name, "results"), params={"confidence": args.confidence})
    rows = []
    for a in report["arms"]:
        cmp = a["vs_control"] or {}
        rows.append([a["arm"] + (" (control)" if a["control"] else ""), a["view"], a["requests"], a["errors"],
                     _ci(a["error_rate"]), a["latency_ms"]["p50"], a["latency_ms"]["p95"], a["ttft_ms"]["p50"],
                     f"{a['prompt_tokens']}/{a['completion_tokens']}", _ci(a["feedback"]), a["feedback"]["n"],
                     _p(cmp.get("feedback")), _p(cmp.get("errors")), _probe_cell(a["probe"], "forget_probability"),
                     _probe_cell(a["probe"], "retain_probability")])
    note = (f"{report['experiment']} ({report['status']}): {round(report['confidence'] * 100)}% intervals; "
            "p = Welch's t-test (feedback) and chi-square / Fisher's exact test (errors) vs the control arm; "
            f"* = significant at {1 - report['confidence']:.2g}")
    return Output(report, RESULT_COLUMNS, rows, note)


def experiments_probes(client: AdminClient, args: argparse.Namespace) -> Output:
    data = client.get(admin_path("experiments", args.name, "probes"))["data"]
    rows = [[p["created_at"], p["arm"], p["view"], (p["view_version"] or "base")[:12], p["samples"], p["metrics"]]
            for p in data]
    return Output(data, ["measured", "arm", "view", "version", "n", "metrics"], rows)


# ---- bundles ---------------------------------------------------------------------------------------------------------


def _bundle_row(b: Mapping[str, Any]) -> list[Any]:
    heads = b["manifest"].get("heads", {})
    return [b["name"], b["content_hash"][:12], heads.get("retain"), ", ".join(heads.get("forget", [])),
            b["manifest"].get("rank"), b["updated_at"]]


BUNDLE_COLUMNS = ["bundle", "version", "retain head", "forget heads", "rank", "updated"]


def _bundle_update(result: Mapping[str, Any]) -> Output:
    views = result.get("views") or []
    return Output(result, BUNDLE_COLUMNS, [_bundle_row(result["bundle"])],
                  note=f"views now serving new versions: {', '.join(views)}" if views else None)


def bundles_list(client: AdminClient, args: argparse.Namespace) -> Output:
    data = client.get("/admin/bundles")["data"]
    return Output(data, BUNDLE_COLUMNS, [_bundle_row(b) for b in data])


def bundles_register(client: AdminClient, args: argparse.Namespace) -> Output:
    body = {"name": args.name, "path": args.path, "replace": args.replace}
    return _bundle_update(client.request("POST", "/admin/bundles", json=body))


def _open_file(path: Path) -> Any:
    try:
        return path.open("rb")
    except OSError as exc:
        raise AdminError(f"cannot read {path}: {exc.strerror}", exit_code=2) from exc


def bundles_upload(client: AdminClient, args: argparse.Namespace) -> Output:
    folder = Path(args.dir)
    with _open_file(folder / "manifest.json") as manifest, _open_file(folder / "weights.safetensors") as weights:
        files = {"manifest": ("manifest.json", manifest, "application/json"),
                 "weights": ("weights.safetensors", weights, "application/octet-stream")}
        data = {"name": args.name, "replace": "true" if args.replace else "false"}
        return _bundle_update(client.request("POST", "/admin/bundles/upload", files=files, data=data))


def bundles_replace_head(client: AdminClient, args: argparse.Namespace) -> Output:
    with _open_file(Path(args.file)) as weights:
        files = {"weights": ("head.safetensors", weights, "application/octet-stream")}
        return _bundle_update(client.request("PUT", admin_path("bundles", args.name, "heads", args.head), files=files))


def bundles_delete(client: AdminClient, args: argparse.Namespace) -> Output:
    return Output(client.request("DELETE", admin_path("bundles", args.name)))


# ---- operations ------------------------------------------------------------------------------------------------------


def gc(client: AdminClient, args: argparse.Namespace) -> Output:
    report = client.request("POST", "/admin/gc", json={"dry_run": args.dry_run})
    rows = [["bundle version", item] for item in report["bundle_versions"]]
    rows += [["bundle folder", item] for item in report["bundle_folders"]]
    rows += [["view folder", item] for item in report["view_folders"]]
    rows += [["upload debris", item] for item in report["debris"]]
    if report["request_log_rows"]:
        rows.append(["request-log rows", report["request_log_rows"]])
    verb = "would remove" if report["dry_run"] else "removed"
    return Output(report, ["kind", "item"], rows, note=f"{verb} {len(rows)} item(s)" if rows else "nothing to remove")


# ---- parser ----------------------------------------------------------------------------------------------------------

def _limit_flags(parser: argparse.ArgumentParser) -> None:
    for flag, what in (("max-concurrent", "sequences in flight (n × prompts per request)"),
                       ("tokens-per-minute", "prompt + completion tokens per minute"),
                       ("max-tokens-cap", "max_tokens per request")):
        parser.add_argument(f"--{flag}", type=_limit_value, default=_UNSET, metavar="N|none",
                            help=f"limit on {what} ('none': unlimited)")


def _add_tenants(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("tenants", help="tenants: views granted and limits").add_subparsers(dest="action", required=True)
    _command(group, "list", tenants_list, "list tenants", common)
    _command(group, "show", tenants_show, "show one tenant", common).add_argument("name")
    create = _command(group, "create", tenants_create, "create a tenant", common)
    create.add_argument("name")
    create.add_argument("--view", action="append", default=[], help="grant a view (repeatable)")
    create.add_argument("--default-view", help="the view used when a request names none of its own")
    _limit_flags(create)
    update = _command(group, "update", tenants_update, "grant/revoke views, change limits, disable/enable", common)
    update.add_argument("name")
    update.add_argument("--grant", action="append", default=[], metavar="VIEW", help="grant a view (repeatable)")
    update.add_argument("--revoke", action="append", default=[], metavar="VIEW", help="revoke a view (repeatable)")
    update.add_argument("--default-view")
    _limit_flags(update)
    state = update.add_mutually_exclusive_group()
    state.add_argument("--disable", dest="disabled", action="store_const", const=True, default=None,
                       help="refuse its keys until enabled again")
    state.add_argument("--enable", dest="disabled", action="store_const", const=False)
    _command(group, "delete", tenants_delete, "delete a tenant and its keys", common).add_argument("name")


def _add_keys(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    _command(group, "list", keys_list, "list keys (never their secrets)", common).add_argument("--tenant")
    create = _command(group, "create", keys_create, "create a tenant key, or with --admin an admin key (shown once)",
                      common)
    create.add_argument("tenant", nargs="?", help="the tenant of a tenant key")
    create.add_argument("--admin", action="store_true", help="an admin key (no tenant)")
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in", dest="expires_at", type=_expiry, metavar="DURATION",
                        help="the key stops working after this long: 90d, 12h, 30m, 3600s (default: never)")
    expiry.add_argument("--expires-at", dest="expires_at", type=_expiry, metavar="TIME",
                        help="the key stops working at this ISO time with a zone, e.g. 2027-01-31T00:00:00Z")
    _command(group, "revoke", keys_revoke, "revoke a key by id", common).add_argument("id", type=int)


def _add_views(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("views", help="views: head weights of a bundle").add_subparsers(dest="action", required=True)
    _command(group, "list", views_list, "list views", common)
    define = _command(group, "define", views_define, "create or change a view (published at once)", common)
    define.add_argument("name")
    define.add_argument("--bundle", required=True)
    define.add_argument("--retain", type=float, default=1.0, help="retain head weight (default 1)")
    define.add_argument("--forget", type=_head_weight, action="append", default=[], metavar="HEAD=WEIGHT",
                        help="forget head and weight (repeatable)")
    define.add_argument("--calibrated", action="store_true",
                        help="scale the forget weights by the bundle's calibrated weight for that many heads")
    _command(group, "delete", views_delete, "delete a view", common).add_argument("name")


def _add_experiments(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("experiments", help="A/B experiments and their results").add_subparsers(dest="action", required=True)
    _command(group, "list", experiments_list, "list experiments", common)
    _command(group, "show", experiments_show, "show one experiment", common).add_argument("name")
    create = _command(group, "create", experiments_create, "create an experiment", common)
    create.add_argument("name")
    create.add_argument("--alias", required=True, help="the model name its tenants send")
    create.add_argument("--tenant", action="append", required=True, help="tenant in the experiment (repeatable)")
    create.add_argument("--arm", type=_arm, action="append", required=True, metavar="ARM=VIEW[:WEIGHT]")
    create.add_argument("--control", help="control arm (default: the first)")
    create.add_argument("--sticky", default="user", help="user | random | header:<name> (default user)")
    create.add_argument("--status", default="running", choices=["running", "paused", "stopped"])
    update = _command(group, "update", experiments_update, "change arms, control, tenants or status", common)
    update.add_argument("name")
    update.add_argument("--arm", type=_arm, action="append", default=None, metavar="ARM=VIEW[:WEIGHT]",
                        help="the new arms (all of them; repeatable)")
    update.add_argument("--control")
    update.add_argument("--tenant", action="append", default=None, help="the new tenants (all of them)")
    update.add_argument("--status", choices=["running", "paused", "stopped"])
    for action, status in (("pause", "paused"), ("resume", "running"), ("stop", "stopped")):
        _command(group, action, _set_status(status), f"set the status to {status}", common).add_argument("name")
    _command(group, "delete", experiments_delete, "delete an experiment", common).add_argument("name")
    results = _command(group, "results", experiments_results, "per-arm results and tests vs control", common)
    results.add_argument("name")
    results.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    _command(group, "probes", experiments_probes, "offline probe history", common).add_argument("name")


def _add_bundles(sub: Any, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("bundles", help="ALTER adapter bundles").add_subparsers(dest="action", required=True)
    _command(group, "list", bundles_list, "list bundles", common)
    register = _command(group, "register", bundles_register, "register a bundle folder on the server", common)
    register.add_argument("name")
    register.add_argument("--path", required=True, help="folder on the server, inside its bundle_dirs")
    register.add_argument("--replace", action="store_true", help="make it the new version of an existing bundle")
    upload = _command(group, "upload", bundles_upload, "upload a local bundle folder", common)
    upload.add_argument("name")
    upload.add_argument("dir", help="folder with manifest.json and weights.safetensors")
    upload.add_argument("--replace", action="store_true", help="make it the new version of an existing bundle")
    head = _command(group, "replace-head", bundles_replace_head, "hot-swap one head's weights", common)
    head.add_argument("name")
    head.add_argument("head")
    head.add_argument("file", help="safetensors file: one [out, rank] tensor per module")
    _command(group, "delete", bundles_delete, "delete a bundle (no view may use it)", common).add_argument("name")


def _add_gc(sub: Any, common: argparse.ArgumentParser) -> None:
    command = _command(sub, "gc", gc, "remove superseded bundle versions, unreferenced bundle and view folders, "
                       "upload debris and request-log rows past the server's retention", common)
    command.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")


def add_admin_commands(subparsers: Any) -> None:
    """Register `tenants`, `keys`, `views`, `experiments`, `bundles` and `gc` on `alter-serve`'s
    sub-parsers. Each leaf command sets `func(args) -> exit status`."""
    common = _connection_flags()
    for add in (_add_tenants, _add_keys, _add_views, _add_experiments, _add_bundles, _add_gc):
        add(subparsers, common)
