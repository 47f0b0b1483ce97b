"""`alter-serve tenants|keys|views|experiments|bundles`: the CLI against a real HTTP server (uvicorn
in a thread, no engine), checking what it prints, what the server stored and the exit status."""

from __future__ import annotations

import json

import httpx
import pytest

from alter_serve.cli import main
from alter_serve.registry import RequestLogEntry

from .admin_app import AdminApp, store_random_bundle
from .server.bundle_factory import random_head_file


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with AdminApp.start(tmp_path_factory.mktemp("cli")) as running:
        yield running


@pytest.fixture
def cli(app, capsys, monkeypatch):
    """Run `alter-serve ...` against the app (URL and key from the environment); (exit code, stdout, stderr)."""
    monkeypatch.setenv("ALTER_SERVE_URL", app.url)
    monkeypatch.setenv("ALTER_SERVE_ADMIN_KEY", app.admin_key)

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def ok(result: tuple[int, str, str]) -> str:
    code, out, err = result
    assert code == 0, err
    return out


def as_json(result: tuple[int, str, str]):
    return json.loads(ok(result))


def test_missing_key_and_unreachable_server_are_clear_errors(cli, monkeypatch):
    monkeypatch.delenv("ALTER_SERVE_ADMIN_KEY")
    code, out, err = cli("tenants", "list")
    assert code == 2 and out == "" and "no admin key; pass --admin-key or set ALTER_SERVE_ADMIN_KEY" in err
    code, _, err = cli("tenants", "list", "--admin-key", "as-x", "--url", "http://127.0.0.1:9")
    assert code == 1 and "cannot reach the server at http://127.0.0.1:9" in err
    code, _, err = cli("tenants", "list", "--admin-key", "as-not-a-real-key")
    assert code == 1 and "Invalid or missing API key" in err and "HTTP 401, invalid_api_key" in err


def test_tenants_create_list_update_and_delete(cli, app):
    created = as_json(cli("tenants", "create", "acme", "--view", "original", "--default-view", "original",
                          "--max-concurrent", "8", "--tokens-per-minute", "5000", "--json"))
    assert created["limits"] == {"max_concurrent": 8, "tokens_per_minute": 5000, "max_tokens_cap": None}
    table = ok(cli("tenants", "list"))
    header, rule, row = table.splitlines()[:3]
    assert header.split()[:3] == ["tenant", "views", "default"] and set(rule) <= {"-", " "}
    assert row.split() == ["acme", "original", "original", "8", "5000", "—", "active"]

    # Only the named limit changes; 'none' clears one.
    updated = as_json(cli("tenants", "update", "acme", "--max-tokens-cap", "256", "--json"))
    assert updated["limits"] == {"max_concurrent": 8, "tokens_per_minute": 5000, "max_tokens_cap": 256}
    updated = as_json(cli("tenants", "update", "acme", "--tokens-per-minute", "none", "--disable", "--json"))
    assert updated["limits"]["tokens_per_minute"] is None and updated["disabled"] is True
    assert app.service.registry.get_tenant("acme").limits.max_tokens_cap == 256

    code, _, err = cli("tenants", "create", "acme")
    assert code == 1 and "already exists" in err and "HTTP 409, conflict" in err
    code, _, err = cli("tenants", "update", "acme", "--max-concurrent", "0")
    assert code == 2 and "must be at least 1" in err  # argparse refuses before any call
    code, _, err = cli("tenants", "show", "nobody")
    assert code == 1 and "tenant 'nobody' not found" in err

    assert as_json(cli("tenants", "delete", "acme", "--json")) == {"deleted": "acme"}
    assert [t.name for t in app.service.registry.list_tenants()] == []


def test_keys_create_list_and_revoke(cli, app):
    ok(cli("tenants", "create", "globex", "--view", "original"))
    out = ok(cli("keys", "create", "globex"))
    secret = next(line.split()[1] for line in out.splitlines() if line.startswith("key "))
    assert secret.startswith("as-") and "Store this key now" in out
    models = httpx.get(app.url + "/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert [m["id"] for m in models.json()["data"]] == ["original"]

    keys = as_json(cli("keys", "list", "--tenant", "globex", "--json"))
    assert len(keys) == 1 and keys[0]["prefix"] == secret[:8] and secret not in json.dumps(keys)
    revoked = as_json(cli("keys", "revoke", str(keys[0]["id"]), "--json"))
    assert revoked["revoked_at"] is not None
    assert httpx.get(app.url + "/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    assert "revoked" in ok(cli("keys", "list", "--tenant", "globex"))

    # A tenant key is not an admin key: the server's 403 message is shown.
    tenant_key = app.service.registry.create_key("globex")[1]
    code, _, err = cli("views", "list", "--admin-key", tenant_key)
    assert code == 1 and "needs an admin key" in err and "HTTP 403" in err


def test_admin_keys_and_expiring_tenant_keys(cli, app):
    created = as_json(cli("keys", "create", "--admin", "--json"))
    assert created["role"] == "admin"
    assert ok(cli("tenants", "list", "--admin-key", created["key"]))  # it administers at once
    admin_rows = [k for k in as_json(cli("keys", "list", "--json")) if k["role"] == "admin"]
    assert created["id"] in [k["id"] for k in admin_rows]
    assert as_json(cli("keys", "revoke", str(created["id"]), "--json"))["revoked_at"] is not None

    ok(cli("tenants", "create", "hooli", "--view", "original"))
    expiring = as_json(cli("keys", "create", "hooli", "--expires-in", "90d", "--json"))
    assert expiring["expires_at"] is not None
    listing = ok(cli("keys", "list", "--tenant", "hooli"))
    assert "expires" in listing and expiring["expires_at"][:10] in listing and "active" in listing
    code, _, err = cli("keys", "create", "--expires-in", "1d")
    assert code == 2 and "--admin" in err  # neither a tenant nor --admin
    code, _, err = cli("keys", "create", "hooli", "--expires-at", "2099-01-01T00:00:00")
    assert code == 2 and "time zone" in err


def test_bundles_views_and_hot_swap(cli, app, tmp_path):
    folder = store_random_bundle(app.service, "rnd", ["x", "y"], seed=5)
    uploaded = as_json(cli("bundles", "upload", "rnd", str(folder), "--json"))
    assert uploaded["bundle"]["manifest"]["heads"]["forget"] == ["x", "y"]
    assert "rnd" in ok(cli("bundles", "list"))
    code, _, err = cli("bundles", "register", "other", "--path", str(tmp_path))
    assert code == 1 and "bundle_dirs" in err

    defined = as_json(cli("views", "define", "no-x", "--bundle", "rnd", "--forget", "x=1", "--json"))
    version = app.service.registry.get_view("no-x").version
    assert defined["version"] == f"no-x@{version}"
    code, _, err = cli("views", "define", "no-xy", "--bundle", "rnd", "--forget", "x=1", "--forget", "y=1", "--calibrated")
    assert code == 1 and "no view calibration" in err  # a random bundle was never calibrated
    listed = ok(cli("views", "list"))
    assert any(line.split()[:2] == ["no-x", "rnd"] and version in line for line in listed.splitlines())

    bundle = app.service.registry.open_bundle("rnd")
    head = random_head_file(bundle, tmp_path / "x.safetensors", seed=9)
    out = ok(cli("bundles", "replace-head", "rnd", "x", str(head)))
    new_version = app.service.registry.get_view("no-x").version
    assert new_version != version and f"views now serving new versions: no-x@{new_version}" in out

    code, _, err = cli("bundles", "delete", "rnd")
    assert code == 1 and "used by view(s) ['no-x']" in err and "HTTP 409" in err
    code, _, err = cli("bundles", "upload", "nope", str(tmp_path / "missing"))
    assert code == 2 and "cannot read" in err


def test_experiments_lifecycle_and_results_table(cli, app):
    if "no-x" not in {v.name for v in app.service.registry.list_views()}:
        folder = store_random_bundle(app.service, "rnd2", ["x"], seed=6)
        ok(cli("bundles", "upload", "rnd2", str(folder)))
        ok(cli("views", "define", "no-x", "--bundle", "rnd2", "--forget", "x=1"))
    ok(cli("tenants", "create", "initech", "--view", "original"))
    code, _, err = cli("experiments", "create", "ab", "--alias", "chat", "--tenant", "initech",
                       "--arm", "control=original", "--arm", "forget=no-x:3")
    assert code == 1 and "tenant 'initech' is not granted view 'no-x'" in err
    ok(cli("tenants", "update", "initech", "--grant", "no-x"))
    created = as_json(cli("experiments", "create", "ab", "--alias", "chat", "--tenant", "initech",
                          "--arm", "control=original", "--arm", "forget=no-x:3", "--json"))
    assert [(a["name"], a["view"], a["weight"]) for a in created["arms"]] == [("control", "original", 1.0),
                                                                                ("forget", "no-x", 3.0)]
    assert created["control_arm"] == "control" and created["status"] == "running"
    assert "control=original:1, forget=no-x:3" in ok(cli("experiments", "list"))
    assert as_json(cli("experiments", "pause", "ab", "--json"))["status"] == "paused"
    assert as_json(cli("experiments", "show", "ab", "--json"))["status"] == "paused"
    updated = as_json(cli("experiments", "update", "ab", "--arm", "control=original:1", "--arm", "forget=no-x:1",
                          "--status", "running", "--json"))
    assert [a["weight"] for a in updated["arms"]] == [1.0, 1.0] and updated["status"] == "running"
    code, _, err = cli("experiments", "update", "ab")
    assert code == 2 and "nothing to change" in err
    code, _, err = cli("experiments", "create", "bad", "--alias", "chat2", "--tenant", "initech", "--arm", "oops")
    assert code == 2 and "expected ARM=VIEW[:WEIGHT]" in err

    app.service.registry.log_requests([
        RequestLogEntry(f"q{i}", "initech", "chat", view, 200, 10.0 * (i + 1), None, "ab", arm, None, 3, 2)
        for i, (arm, view) in enumerate([("control", "original"), ("forget", "no-x")] * 3)])
    out = ok(cli("experiments", "results", "ab"))
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["arm", "view", "requests", "errors"]
    control = lines[2].split()
    assert control[:5] == ["control", "(control)", "original", "3", "0"]
    assert "Welch's t-test" in lines[-1] and "(running)" in lines[-1]
    report = as_json(cli("experiments", "results", "ab", "--json"))
    assert report["arms"][1]["latency_ms"]["p50"] == 40.0  # forget arm: 20, 40, 60 ms
    assert ok(cli("experiments", "probes", "ab")).strip() == "(none)"
    assert as_json(cli("experiments", "delete", "ab", "--json")) == {"deleted": "ab"}
    code, _, err = cli("experiments", "results", "ab")
    assert code == 1 and "experiment 'ab' not found" in err


def test_names_are_escaped_in_url_paths(cli, app):
    """A name is one path segment, whatever it contains: `views delete ../bundles/NAME` must not
    delete a bundle."""
    folder = store_random_bundle(app.service, "victim", ["x"], seed=7)
    ok(cli("bundles", "upload", "victim", str(folder)))
    for name in ("../bundles/victim", "..", ".", "victim?x=1", "%2e%2e"):
        code, _, err = cli("views", "delete", name)
        assert code == 1 and "HTTP 404" in err, (name, err)
    assert "victim" in {b.name for b in app.service.registry.list_bundles()}
    ok(cli("bundles", "delete", "victim"))


def test_every_path_segment_is_quoted_and_a_non_json_answer_is_a_clear_error():
    from argparse import Namespace

    from alter_serve.admin_cli import AdminClient, AdminError, admin_path, experiments_show, run_command

    assert admin_path("views", "../bundles/prod") == "/admin/views/..%2Fbundles%2Fprod"
    assert admin_path("tenants", "acme?x=1#f") == "/admin/tenants/acme%3Fx%3D1%23f"
    assert admin_path("experiments", "..", "results") == "/admin/experiments/%2E%2E/results"
    assert admin_path("keys", 12) == "/admin/keys/12" and admin_path("views", "a.b") == "/admin/views/a.b"
    seen = []

    def proxy_page(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        return httpx.Response(200, text="<html>login</html>", headers={"content-type": "text/html"})

    client = AdminClient("http://proxy", "as-x", transport=httpx.MockTransport(proxy_page))
    with pytest.raises(AdminError, match=r"answered GET /admin/experiments/%2E%2E with HTTP 200 but not with JSON "
                                         r"\(text/html\); is http://proxy an alter-serve server\?"):
        client.get(admin_path("experiments", ".."))
    args = Namespace(url="http://proxy", admin_key="as-x", timeout=5.0, json=False, name="a/b")
    assert run_command(experiments_show, args, httpx.MockTransport(proxy_page)) == 1
    assert seen == ["/admin/experiments/%2E%2E", "/admin/experiments/a%2Fb"]
