"""The persistent registry, with tiny hand-made ALTER bundles (rank 8). Every test that takes `reg`
runs twice: on a tmp_path SQLite file and on a fresh database of the session's PostgreSQL cluster
(`registry_url` in conftest.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import event, inspect, text

from alter_serve.core.bundle import AlterBundle
from alter_serve.core.manifest import BaseModelRef, Heads, Manifest
from alter_serve.core.views import View
from alter_serve.registry import (
    Conflict,
    InvalidInput,
    Limits,
    NotFound,
    Registry,
    RequestLogEntry,
)

FINGERPRINT = "sha256:" + "ab" * 32
RANK, ALPHA = 8, 16.0
BASE_SHAPES = {
    "model.layers.0.self_attn.q_proj": (16, 12),
    "model.layers.0.self_attn.v_proj": (8, 12),
    "model.layers.1.self_attn.q_proj": (16, 12),
    "model.layers.1.self_attn.v_proj": (8, 12),
}
Q0 = "model.layers.0.self_attn.q_proj"


def make_bundle(seed: int, forget: tuple[str, ...] = ("bio", "cyber"), fingerprint: str = FINGERPRINT) -> AlterBundle:
    g = torch.Generator().manual_seed(seed)
    manifest = Manifest(
        base_model=BaseModelRef(name_or_path="tiny-base", fingerprint=fingerprint),
        rank=RANK, alpha=ALPHA, target_modules=["q_proj", "v_proj"], heads=Heads(forget=list(forget)),
    )
    lora_a = {m: torch.randn(RANK, i, generator=g) for m, (o, i) in BASE_SHAPES.items()}
    retain = {m: torch.randn(o, RANK, generator=g) for m, (o, i) in BASE_SHAPES.items()}
    heads = {h: {m: torch.randn(o, RANK, generator=g) for m, (o, i) in BASE_SHAPES.items()} for h in forget}
    return AlterBundle(manifest, lora_a, retain, heads)


def write_bundle(bundle: AlterBundle, folder: Path) -> Path:
    return bundle.save(folder)


def write_raw_bundle(bundle: AlterBundle, folder: Path) -> Path:
    """Write without `save`'s validation, to produce bundles the registry must refuse."""
    folder.mkdir(parents=True)
    save_file(bundle.to_tensors(), str(folder / "weights.safetensors"))
    (folder / "manifest.json").write_text(bundle.manifest.model_dump_json())
    return folder


def head_file(path: Path, seed: int, key_format: str = "{module}") -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {key_format.format(module=m): torch.randn(o, RANK, generator=g) for m, (o, i) in BASE_SHAPES.items()}
    save_file(tensors, str(path))
    return path


def store_listing(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def open_registry(url: str, tmp_path: Path) -> Registry:
    registry = Registry(url, tmp_path / "data", base_fingerprint=FINGERPRINT, base_shapes=BASE_SHAPES)
    registry.create_all()
    return registry


@pytest.fixture
def reg(registry_url, tmp_path):
    registry = open_registry(registry_url, tmp_path)
    yield registry
    registry.close()


@pytest.fixture
def sqlite_reg(tmp_path):
    """For the SQLite-only behaviour (WAL, BEGIN IMMEDIATE)."""
    registry = open_registry(f"sqlite:///{tmp_path / 'registry.db'}", tmp_path)
    yield registry
    registry.close()


def dump_database(registry: Registry) -> str:
    """Every row of every table, as text (to show a secret is stored nowhere)."""
    with registry.engine.connect() as conn:
        tables = inspect(conn).get_table_names()
        return "\n".join(repr(row) for table in tables for row in conn.execute(text(f'SELECT * FROM "{table}"')))


@pytest.fixture
def alpha(reg, tmp_path):
    """Bundle 'alpha' (heads bio, cyber) with views no-bio and no-cyber."""
    reg.store_bundle("alpha", write_bundle(make_bundle(0), tmp_path / "src-alpha"))
    reg.define_view(View(name="no-bio", forget={"bio": 1.0}), "alpha")
    reg.define_view(View(name="no-cyber", forget={"cyber": 0.5}), "alpha")
    return reg


# ---- setup ----------------------------------------------------------------------------------------


def test_create_all_makes_original(reg, tmp_path):
    reg.create_all()  # idempotent
    views = reg.list_views()
    assert [v.name for v in views] == ["original"]
    original = views[0]
    assert original.is_original and original.bundle is None and original.composed is None
    assert reg.views_revision() == 0
    assert (tmp_path / "data" / "bundles").is_dir() and (tmp_path / "data" / "views").is_dir()


def test_sqlite_uses_wal(sqlite_reg, tmp_path):
    with sqlite3.connect(tmp_path / "registry.db") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_replicas_starting_together_create_the_tables_once(registry_url, tmp_path):
    with ThreadPoolExecutor(max_workers=4) as pool:
        replicas = list(pool.map(lambda _: open_registry(registry_url, tmp_path), range(4)))
    assert [v.name for v in replicas[0].list_views()] == ["original"]
    for replica in replicas:
        replica.close()


def test_writes_take_the_lock_up_front(sqlite_reg):
    reg = sqlite_reg
    begins = []
    event.listen(reg.engine, "before_cursor_execute",
                 lambda conn, cur, stmt, *a: begins.append(stmt) if stmt.startswith("BEGIN") else None)
    reg.create_tenant("acme")
    reg.get_tenant("acme")
    assert begins == ["BEGIN IMMEDIATE", "BEGIN"]


# ---- API keys -------------------------------------------------------------------------------------


def test_key_secret_is_never_stored(reg, tmp_path):
    reg.create_tenant("acme", views=["original"], default_view="original",
                      limits=Limits(max_concurrent=4, tokens_per_minute=1000, max_tokens_cap=256))
    key_id, secret = reg.create_key("acme")
    assert secret.startswith("as-") and len(secret) == 3 + 43
    with reg.engine.connect() as conn:
        row = conn.execute(text("SELECT prefix, key_hash, role, revoked_at FROM api_keys WHERE id = :id"),
                           {"id": key_id}).one()
    dump = dump_database(reg)
    assert tuple(row) == (secret[:8], hashlib.sha256(secret.encode()).hexdigest(), "tenant", None)
    assert secret[:8] in dump
    assert secret not in dump and secret[3:] not in dump
    listed = reg.list_keys("acme")
    assert [(k.id, k.tenant, k.role, k.prefix, k.active) for k in listed] == [(key_id, "acme", "tenant", secret[:8], True)]

    principal = reg.authenticate(secret)
    assert principal is not None
    assert (principal.key_id, principal.role, principal.tenant_name) == (key_id, "tenant", "acme")
    assert principal.views == frozenset({"original"}) and principal.default_view == "original"
    assert principal.limits == Limits(max_concurrent=4, tokens_per_minute=1000, max_tokens_cap=256)
    for wrong in (secret[:-1], secret + "x", secret[:-1] + ("A" if secret[-1] != "A" else "B"), " " + secret,
                  secret.upper(), "", "as-", None, 42, "as-" + "x" * 500):
        assert reg.authenticate(wrong) is None, wrong


def test_revoked_key_is_refused_immediately_on_every_replica(reg, registry_url, tmp_path):
    reg.create_tenant("acme", views=["original"])
    key_id, secret = reg.create_key("acme")
    other_id, other = reg.create_key("acme")
    replica = Registry(registry_url, tmp_path / "data")
    assert reg.authenticate(secret) is not None and replica.authenticate(secret) is not None
    revoked = reg.revoke_key(key_id)
    assert not revoked.active and revoked.revoked_at is not None
    assert reg.authenticate(secret) is None
    assert replica.authenticate(secret) is None
    assert reg.authenticate(other).key_id == other_id
    assert reg.revoke_key(key_id).revoked_at == revoked.revoked_at  # idempotent, keeps the first time
    with pytest.raises(NotFound, match="API key 999 not found"):
        reg.revoke_key(999)
    replica.close()


def test_keys_expire_and_an_older_registry_gets_the_column(reg, registry_url, tmp_path):
    """`api_keys.expires_at` is new: create_all adds it to a registry made before it (both backends)."""
    from datetime import datetime, timedelta, timezone

    reg.create_tenant("acme", views=["original"])
    _, forever = reg.create_key("acme")
    with reg.engine.begin() as conn:
        conn.execute(text("ALTER TABLE api_keys DROP COLUMN expires_at"))
    upgraded = Registry(registry_url, tmp_path / "data")
    upgraded.create_all()
    assert upgraded.authenticate(forever) is not None and upgraded.list_keys()[0].expires_at is None
    soon = datetime.now(timezone.utc) + timedelta(hours=1)
    key_id, expiring = upgraded.create_key("acme", expires_at=soon)
    assert upgraded.authenticate(expiring) is not None
    with upgraded.engine.begin() as conn:  # an hour and a bit later
        conn.execute(text("UPDATE api_keys SET expires_at = :t WHERE id = :i"),
                     {"t": datetime(2020, 1, 1), "i": key_id})
    assert upgraded.authenticate(expiring) is None
    assert not next(k for k in upgraded.list_keys() if k.id == key_id).active
    with pytest.raises(InvalidInput, match="not in the future"):
        upgraded.create_key("acme", expires_at=datetime(2020, 1, 1, tzinfo=timezone.utc))
    with pytest.raises(InvalidInput, match="no time zone"):
        upgraded.create_key("acme", expires_at=datetime(2099, 1, 1))
    upgraded.close()


def test_the_last_active_admin_key_cannot_be_revoked(reg):
    first, _ = reg.create_key(None, "admin")
    with pytest.raises(Conflict, match="last active admin key"):
        reg.revoke_key(first)
    second, _ = reg.create_key(None, "admin")
    assert reg.revoke_key(first).revoked_at is not None
    with pytest.raises(Conflict, match="last active admin key"):
        reg.revoke_key(second)


def test_disabled_or_deleted_tenant_keys_fail(reg):
    reg.create_tenant("acme", views=["original"])
    _, secret = reg.create_key("acme")
    reg.set_disabled("acme", True)
    assert reg.authenticate(secret) is None
    reg.set_disabled("acme", False)
    assert reg.authenticate(secret).tenant_name == "acme"
    reg.delete_tenant("acme")
    assert reg.authenticate(secret) is None
    assert reg.list_keys() == []


def test_admin_keys(reg):
    key_id, secret = reg.create_key(None, "admin")
    principal = reg.authenticate(secret)
    assert principal.is_admin and principal.key_id == key_id and principal.tenant_name is None
    assert principal.views == frozenset()
    assert reg.request_context(secret, "original").view is None  # admin keys serve no models
    reg.create_tenant("acme")
    with pytest.raises(InvalidInput, match="admin keys belong to no tenant"):
        reg.create_key("acme", "admin")
    with pytest.raises(InvalidInput, match="needs a tenant"):
        reg.create_key(None, "tenant")
    with pytest.raises(InvalidInput, match="role 'root'"):
        reg.create_key("acme", "root")
    with pytest.raises(NotFound, match="tenant 'nobody' not found"):
        reg.create_key("nobody")


# ---- grants and model resolution ------------------------------------------------------------------


def test_model_names_are_exact_and_limited_to_grants(alpha):
    """The request path's model resolution (`request_context`): a tenant's `model` field names a
    granted view exactly, or nothing."""
    reg = alpha
    reg.create_tenant("acme", views=["original", "no-bio"], default_view="no-bio")
    reg.create_tenant("globex", views=["no-cyber"])
    acme = reg.create_key("acme")[1]

    context = reg.request_context(acme, "no-bio")
    view = reg.get_view("no-bio")
    assert context.view == "no-bio" and view.bundle == "alpha"
    assert context.composed.lora_name == f"no-bio@{view.content_hash[:12]}"
    assert context.composed.path == view.path == reg.data_dir / "views" / view.content_hash
    original = reg.request_context(acme, "original")
    assert original.view == "original" and original.composed is None
    for variant in ("No-Bio", "NO-BIO", " no-bio", "no-bio ", "no-bio\n", "\tno-bio", "no_bio", "nobio",
                    f"no-bio@{view.content_hash[:12]}", "", "Original", "no-cyber", "does-not-exist", None, 42):
        assert reg.request_context(acme, variant).view is None, repr(variant)

    globex = reg.create_key("globex")[1]
    assert reg.request_context(globex, "no-cyber").view == "no-cyber"
    assert reg.request_context(globex, "no-bio").view is None and reg.request_context(globex, "original").view is None

    # every request reads the grants again: no principal taken earlier is trusted
    principal = reg.authenticate(acme)
    reg.revoke_view("acme", "original")
    assert "original" in principal.views and reg.request_context(acme, "original").view is None


def test_grants_and_default_view(alpha):
    reg = alpha
    with pytest.raises(InvalidInput, match="default view 'no-bio' of tenant 'acme' is not among"):
        reg.create_tenant("acme", views=["original"], default_view="no-bio")
    with pytest.raises(NotFound, match=r"view\(s\) \['missing'\] not found"):
        reg.create_tenant("acme", views=["original", "missing"])
    assert reg.list_tenants() == []  # neither failure left a tenant behind
    reg.create_tenant("acme", views=["no-bio"], default_view="no-bio")
    assert reg.grant_view("acme", "original").views == ("no-bio", "original")
    assert reg.grant_view("acme", "original").views == ("no-bio", "original")  # idempotent
    with pytest.raises(Conflict, match="default view of tenant 'acme'; set another default first"):
        reg.revoke_view("acme", "no-bio")
    with pytest.raises(InvalidInput, match="not granted to tenant 'acme'"):
        reg.set_default_view("acme", "no-cyber")
    assert reg.set_default_view("acme", "original").default_view == "original"
    assert reg.revoke_view("acme", "no-bio").views == ("original",)
    with pytest.raises(NotFound, match="has no grant for view 'no-bio'"):
        reg.revoke_view("acme", "no-bio")
    with pytest.raises(Conflict, match="tenant 'acme' already exists"):
        reg.create_tenant("acme")
    with pytest.raises(InvalidInput, match="tenant name 'Acme Corp'"):
        reg.create_tenant("Acme Corp")
    limited = reg.set_limits("acme", Limits(tokens_per_minute=500))
    assert limited.limits == Limits(max_concurrent=None, tokens_per_minute=500, max_tokens_cap=None)
    assert reg.get_tenant("acme").limits.tokens_per_minute == 500


# ---- bundle store ---------------------------------------------------------------------------------


def test_store_bundle_is_content_addressed(reg, tmp_path):
    bundle = make_bundle(0)
    update = reg.store_bundle("alpha", write_bundle(bundle, tmp_path / "src"))
    info = update.bundle
    assert update.previous_hash is None and update.views == ()
    assert info.content_hash == bundle.content_hash()
    assert info.path == tmp_path / "data" / "bundles" / info.content_hash
    assert sorted(p.name for p in info.path.iterdir()) == ["manifest.json", "weights.safetensors"]
    assert info.base_fingerprint == FINGERPRINT and info.forget_heads == ["bio", "cyber"]
    assert reg.open_bundle("alpha").content_hash() == info.content_hash
    stored = load_file(str(info.path / "weights.safetensors"))
    assert torch.equal(stored[f"{Q0}.B.forget.bio"], bundle.forget["bio"][Q0])

    with pytest.raises(Conflict, match="bundle 'alpha' already exists .*replace=True"):
        reg.store_bundle("alpha", tmp_path / "src")
    same = reg.store_bundle("alpha-copy", tmp_path / "src").bundle  # same content, same folder
    assert same.path == info.path
    assert store_listing(tmp_path / "data" / "bundles") == [info.content_hash]
    assert [b.name for b in reg.list_bundles()] == ["alpha", "alpha-copy"]
    [version] = reg.list_bundle_versions("alpha")
    assert version.current and version.content_hash == info.content_hash


def test_invalid_bundle_leaves_no_row_and_no_folder(reg, tmp_path):
    bad_shapes = make_bundle(1)
    bad_shapes.retain[Q0] = torch.randn(15, RANK)
    wrong_base = make_bundle(2, fingerprint="sha256:" + "cd" * 32)
    for index, bundle in enumerate([bad_shapes, wrong_base]):
        src = write_raw_bundle(bundle, tmp_path / f"bad-{index}")
        with pytest.raises(InvalidInput) as caught:
            reg.store_bundle("bad", src)
        assert caught.value.problems
    assert reg.list_bundles() == []
    assert store_listing(tmp_path / "data" / "bundles") == []
    with pytest.raises(InvalidInput, match="bundle name 'Bad'"):
        reg.store_bundle("Bad", write_bundle(make_bundle(3), tmp_path / "good"))
    with pytest.raises(InvalidInput, match="not a directory"):
        reg.store_bundle("missing", tmp_path / "nowhere")
    assert store_listing(tmp_path / "data" / "bundles") == []


def test_nan_bundle_is_refused_with_the_problem_listed(reg, tmp_path):
    bundle = make_bundle(4)
    bundle.forget["bio"][Q0][3, 2] = float("nan")
    bundle.lora_a["model.layers.1.self_attn.v_proj"][0, 0] = float("inf")
    with pytest.raises(InvalidInput) as caught:
        reg.store_bundle("nan", write_raw_bundle(bundle, tmp_path / "nan"))
    assert sorted(caught.value.problems) == [
        "model.layers.0.self_attn.q_proj.B.forget.bio: contains NaN or Inf",
        "model.layers.1.self_attn.v_proj.lora_A: contains NaN or Inf",
    ]
    assert "contains NaN or Inf" in str(caught.value)
    assert reg.list_bundles() == [] and store_listing(tmp_path / "data" / "bundles") == []


def test_failure_after_the_files_are_written_removes_them(reg, tmp_path, monkeypatch):
    def broken_insert(self, session, name, bundle, digest):
        raise RuntimeError("database went away")

    monkeypatch.setattr(Registry, "_insert_bundle", broken_insert)
    with pytest.raises(RuntimeError, match="database went away"):
        reg.store_bundle("alpha", write_bundle(make_bundle(0), tmp_path / "src"))
    assert reg.list_bundles() == []
    assert store_listing(tmp_path / "data" / "bundles") == []


# ---- views ----------------------------------------------------------------------------------------


def _record_fsyncs(monkeypatch) -> list[Path]:
    """Patch os.fsync to note the path behind each file descriptor it flushes, in order."""
    flushed: list[Path] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        flushed.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return flushed


def test_the_folders_vllm_loads_are_fsynced_before_and_after_they_are_published(sqlite_reg, tmp_path, monkeypatch):
    """A view folder is what vLLM loads: its files and the staging folder are flushed before the
    rename that publishes it, and the view store after it (so is a stored bundle's folder)."""
    reg = sqlite_reg
    flushed = _record_fsyncs(monkeypatch)
    reg.store_bundle("alpha", write_bundle(make_bundle(0), tmp_path / "src-alpha"))
    bundles = (tmp_path / "data" / "bundles").resolve()
    assert sorted(p.name for p in flushed[:-2]) == ["manifest.json", "weights.safetensors"]
    assert flushed[-2].parent == bundles and flushed[-2].name.startswith(".staging-") and flushed[-1] == bundles

    flushed.clear()
    reg.define_view(View(name="no-bio", forget={"bio": 1.0}), "alpha")
    views = (tmp_path / "data" / "views").resolve()
    staging = flushed[-2]
    assert staging.parent == views and staging.name.startswith(".compose-")
    assert sorted(flushed[:-2]) == [staging / "adapter_config.json", staging / "adapter_model.safetensors"]
    assert flushed[-1] == views

    flushed.clear()
    reg.define_view(View(name="no-bio-again", forget={"bio": 1.0}), "alpha")  # same content: the folder is reused
    assert flushed == []


def test_define_view_composes_the_weighted_heads(alpha, tmp_path):
    reg = alpha
    bundle = make_bundle(0)
    view = reg.get_view("no-cyber")
    assert view.spec == View(name="no-cyber", retain=1.0, forget={"cyber": 0.5}) and view.bundle == "alpha"
    tensors = load_file(str(view.path / "adapter_model.safetensors"))
    expected_b = bundle.retain[Q0] + 0.5 * bundle.forget["cyber"][Q0]
    assert torch.allclose(tensors[f"base_model.model.{Q0}.lora_B.weight"], expected_b)
    assert torch.equal(tensors[f"base_model.model.{Q0}.lora_A.weight"], bundle.lora_a[Q0])
    config = json.loads((view.path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    assert [v.name for v in reg.list_views()] == ["no-bio", "no-cyber", "original"]

    with pytest.raises(Conflict, match="view 'no-bio' already exists; pass replace=True"):
        reg.define_view(View(name="no-bio", forget={"bio": 2.0}), "alpha")
    old = reg.get_view("no-bio")
    change = reg.define_view(View(name="no-bio", forget={"bio": 2.0}), "alpha", replace=True)
    assert change.previous.content_hash == old.content_hash
    assert change.view.content_hash != old.content_hash and change.view.spec.forget == {"bio": 2.0}

    with pytest.raises(InvalidInput, match=r"names forget heads \['chem'\] that the bundle lacks"):
        reg.define_view(View(name="no-chem", forget={"chem": 1.0}), "alpha")
    with pytest.raises(NotFound, match="bundle 'beta' not found"):
        reg.define_view(View(name="x"), "beta")
    with pytest.raises(InvalidInput, match="built-in base-model view"):
        reg.define_view(View(name="original"), "alpha")
    with pytest.raises(InvalidInput, match="needs a bundle"):
        reg.define_view(View(name="x"), None)
    assert [v.name for v in reg.list_views()] == ["no-bio", "no-cyber", "original"]


def test_remove_view_refuses_views_in_use(alpha):
    reg = alpha
    reg.create_tenant("acme", views=["original", "no-bio"])
    reg.create_tenant("globex", views=["original", "no-cyber"])
    reg.create_experiment("cyber-test", alias="chat", tenants=["globex"],
                          arms=[{"name": "base", "view": "original", "weight": 1},
                                {"name": "forget", "view": "no-cyber", "weight": 1}])
    with pytest.raises(Conflict, match=r"view 'no-bio' is granted to tenant\(s\) \['acme'\]; revoke"):
        reg.remove_view("no-bio")
    with pytest.raises(Conflict, match=r"view 'no-cyber' is granted to tenant\(s\) \['globex'\]; revoke"):
        reg.remove_view("no-cyber")
    with pytest.raises(Conflict, match=r"view 'no-cyber' is an arm of experiment\(s\) \['cyber-test'\] of tenant "
                                       "'globex'; stop them or change their arms first"):
        reg.revoke_view("globex", "no-cyber")
    with pytest.raises(Conflict, match="cannot be removed"):
        reg.remove_view("original")
    with pytest.raises(NotFound, match="view 'nope' not found"):
        reg.remove_view("nope")

    reg.revoke_view("acme", "no-bio")
    removed = reg.remove_view("no-bio")
    assert removed.name == "no-bio" and removed.path.is_dir()  # the folder outlives the row until pruned
    reg.update_experiment("cyber-test", status="stopped")
    reg.revoke_view("globex", "no-cyber")
    reg.remove_view("no-cyber")
    assert [v.name for v in reg.list_views()] == ["original"]
    composed = store_listing(reg.data_dir / "views")
    assert len(composed) == 2 and removed.content_hash in composed
    assert reg.prune_view_store(keep=[removed.content_hash]) == [h for h in composed if h != removed.content_hash]
    assert reg.prune_view_store() == [removed.content_hash]
    assert store_listing(reg.data_dir / "views") == []
    with pytest.raises(NotFound, match=r"view\(s\) \['no-cyber'\] not found"):
        reg.update_experiment("cyber-test", status="running")  # it cannot run without its view


def test_views_revision_moves_with_every_view_change_and_nothing_else(alpha, tmp_path):
    reg = alpha
    start = reg.views_revision()
    assert start == 2  # the fixture defined two views
    reg.create_tenant("acme", views=["no-bio"])
    reg.create_key("acme")
    reg.store_bundle("beta", write_bundle(make_bundle(5), tmp_path / "src-beta"))
    assert reg.views_revision() == start  # tenants, keys, an unused bundle: no view serves anything new
    reg.replace_head("alpha", "bio", head_file(tmp_path / "bio.safetensors", seed=3))
    assert reg.views_revision() == start + 1  # no-bio recomposed
    reg.replace_head("alpha", "bio", head_file(tmp_path / "bio.safetensors", seed=3))
    assert reg.views_revision() == start + 1  # the same weights again: nothing changed
    reg.define_view(View(name="beta-bio", forget={"bio": 1.0}), "beta")
    reg.remove_view("no-cyber")
    assert reg.views_revision() == start + 3
    with pytest.raises(Conflict):
        reg.remove_view("no-bio")  # granted: refused, and the revision stays
    assert reg.views_revision() == start + 3


def test_ensure_composed_recomposes_a_missing_folder(alpha):
    reg = alpha
    view = reg.get_view("no-bio")
    assert reg.ensure_composed("original") is None
    assert reg.ensure_composed("no-bio") == view.composed
    shutil.rmtree(view.path)  # e.g. a replica whose view store never got the folder another one composed
    rebuilt = reg.ensure_composed("no-bio")
    assert rebuilt == view.composed and (view.path / "adapter_model.safetensors").is_file()
    shutil.rmtree(view.path)
    shutil.rmtree(reg.get_bundle("alpha").path)
    with pytest.raises(NotFound, match="every replica must share data_dir"):
        reg.ensure_composed("no-bio")
    with pytest.raises(NotFound, match="view 'gone' not found"):
        reg.ensure_composed("gone")


def test_concurrent_identical_grants_are_idempotent(alpha):
    reg = alpha
    reg.create_tenant("acme")
    with ThreadPoolExecutor(max_workers=6) as pool:
        granted = list(pool.map(lambda _: reg.grant_view("acme", "no-bio"), range(12)))
    assert all(g.views == ("no-bio",) for g in granted)


# ---- head replacement and recomposition -----------------------------------------------------------


def test_replace_head_makes_a_new_version_and_recomposes_only_affected_views(alpha, tmp_path):
    reg = alpha
    reg.store_bundle("beta", write_bundle(make_bundle(5), tmp_path / "src-beta"))
    reg.define_view(View(name="beta-no-bio", forget={"bio": 1.0}), "beta")
    reg.define_view(View(name="alpha-retain"), "alpha")
    before = {v.name: v for v in reg.list_views()}
    old_hash = reg.get_bundle("alpha").content_hash

    update = reg.replace_head("alpha", "bio", head_file(tmp_path / "bio.safetensors", seed=99))
    assert update.changed and update.previous_hash == old_hash
    new_hash = update.bundle.content_hash
    assert new_hash != old_hash and reg.get_bundle("alpha").content_hash == new_hash
    assert [c.name for c in update.views] == ["no-bio"]
    [change] = update.views
    assert change.previous.content_hash == before["no-bio"].content_hash
    assert change.view.content_hash != before["no-bio"].content_hash
    assert change.view.composed.lora_name != change.previous.lora_name
    after = {v.name: v for v in reg.list_views()}
    for untouched in ("no-cyber", "alpha-retain", "beta-no-bio", "original"):
        assert after[untouched].content_hash == before[untouched].content_hash, untouched
        assert after[untouched].updated_at == before[untouched].updated_at

    # the new composition is w_r·B_r + w_bio·B_bio(new), the stored bundle holds the new head
    new_bio = load_file(str(tmp_path / "bio.safetensors"))
    tensors = load_file(str(after["no-bio"].path / "adapter_model.safetensors"))
    expected = make_bundle(0).retain[Q0] + new_bio[Q0]
    assert torch.allclose(tensors[f"base_model.model.{Q0}.lora_B.weight"], expected)
    assert torch.equal(reg.open_bundle("alpha").forget["bio"][Q0], new_bio[Q0])

    # the old version stays findable (and on disk) until it is dropped after draining
    versions = reg.list_bundle_versions("alpha")
    assert [(v.content_hash, v.current) for v in versions] == [(new_hash, True), (old_hash, False)]
    assert versions[1].path.is_dir() and before["no-bio"].path.is_dir()
    with pytest.raises(Conflict, match="is the current version"):
        reg.drop_bundle_version("alpha", new_hash)
    reg.drop_bundle_version("alpha", old_hash)
    assert not versions[1].path.exists()
    assert [v.content_hash for v in reg.list_bundle_versions("alpha")] == [new_hash]

    # replacing the retain head changes every view of alpha, and nothing of beta
    retain_update = reg.replace_head("alpha", "retain",
                                     head_file(tmp_path / "retain.safetensors", seed=7, key_format="{module}.B.retain"))
    assert [c.name for c in retain_update.views] == ["alpha-retain", "no-bio", "no-cyber"]
    assert reg.get_view("beta-no-bio").content_hash == before["beta-no-bio"].content_hash
    assert reg.recompose_views_for_bundle("alpha") == []  # already up to date


def test_replacing_with_identical_weights_changes_nothing(alpha, tmp_path):
    reg = alpha
    bundle = make_bundle(0)
    save_file({m: t for m, t in bundle.forget["cyber"].items()}, str(tmp_path / "same.safetensors"))
    update = reg.replace_head("alpha", "cyber", tmp_path / "same.safetensors")
    assert not update.changed and update.views == ()
    assert len(reg.list_bundle_versions("alpha")) == 1


def test_invalid_head_replacement_changes_nothing(alpha, tmp_path):
    reg = alpha
    before_views = {v.name: v.content_hash for v in reg.list_views()}
    before_files = (store_listing(reg.data_dir / "bundles"), store_listing(reg.data_dir / "views"))
    old_hash = reg.get_bundle("alpha").content_hash

    g = torch.Generator().manual_seed(1)
    nan_heads = {m: torch.randn(o, RANK, generator=g) for m, (o, i) in BASE_SHAPES.items()}
    nan_heads[Q0][0, 0] = float("nan")
    save_file(nan_heads, str(tmp_path / "nan.safetensors"))
    with pytest.raises(InvalidInput) as caught:
        reg.replace_head("alpha", "bio", tmp_path / "nan.safetensors")
    assert caught.value.problems == [f"{Q0}.B.forget.bio: contains NaN or Inf"]

    short = {m: torch.randn(o, RANK) for m, (o, i) in BASE_SHAPES.items() if m != Q0}
    short["model.layers.9.mlp.up_proj"] = torch.randn(4, RANK)
    save_file(short, str(tmp_path / "short.safetensors"))
    with pytest.raises(InvalidInput) as caught:
        reg.replace_head("alpha", "bio", tmp_path / "short.safetensors")
    assert caught.value.problems == [
        "tensor 'model.layers.9.mlp.up_proj': not an adapted module of this bundle (expected '<module>' or "
        "'<module>.B.forget.bio' for modules like ['model.layers.0.self_attn.q_proj', "
        "'model.layers.0.self_attn.v_proj', 'model.layers.1.self_attn.q_proj'])"
    ]
    save_file({m: t for m, t in short.items() if "up_proj" not in m}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(InvalidInput) as caught:
        reg.replace_head("alpha", "bio", tmp_path / "missing.safetensors")
    assert caught.value.problems == [f"{Q0}.B.forget.bio: missing"]

    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidInput, match="could not be read"):
        reg.replace_head("alpha", "bio", tmp_path / "junk.safetensors")
    with pytest.raises(NotFound, match=r"has no head 'chem'; its heads are \['retain', 'bio', 'cyber'\]"):
        reg.replace_head("alpha", "chem", tmp_path / "nan.safetensors")
    with pytest.raises(NotFound, match="bundle 'beta' not found"):
        reg.replace_head("beta", "bio", tmp_path / "nan.safetensors")

    assert reg.get_bundle("alpha").content_hash == old_hash
    assert {v.name: v.content_hash for v in reg.list_views()} == before_views
    assert (store_listing(reg.data_dir / "bundles"), store_listing(reg.data_dir / "views")) == before_files


def test_new_bundle_version_that_drops_a_used_head_is_refused(alpha, tmp_path):
    reg = alpha
    old_hash = reg.get_bundle("alpha").content_hash
    src = write_bundle(make_bundle(8, forget=("cyber",)), tmp_path / "v2")
    with pytest.raises(InvalidInput) as caught:
        reg.store_bundle("alpha", src, replace=True)
    assert "would break 1 view(s)" in str(caught.value)
    assert caught.value.problems == [
        "view 'no-bio' names forget heads ['bio'] that the bundle lacks; it has ['cyber']"
    ]
    assert reg.get_bundle("alpha").content_hash == old_hash
    assert store_listing(reg.data_dir / "bundles") == [old_hash]

    reg.remove_view("no-bio")
    update = reg.store_bundle("alpha", src, replace=True)
    assert update.changed and [c.name for c in update.views] == ["no-cyber"]
    assert reg.open_bundle("alpha").forget_heads == ["cyber"]


def test_remove_bundle(alpha, tmp_path):
    reg = alpha
    with pytest.raises(Conflict, match=r"used by view\(s\) \['no-bio', 'no-cyber'\]; remove those views first"):
        reg.remove_bundle("alpha")
    path = reg.get_bundle("alpha").path
    reg.remove_view("no-bio")
    reg.remove_view("no-cyber")
    reg.remove_bundle("alpha")
    assert reg.list_bundles() == [] and not path.exists()



def test_request_context_is_authenticate_plus_routing_in_one_read(alpha):
    """`request_context` (the request path: one statement) answers as authenticate, the experiment
    for the alias and the granted view would, and sees every change on the next call (no cache)."""
    reg = alpha
    reg.create_tenant("acme", views=["original", "no-bio"], default_view="no-bio", limits=Limits(max_concurrent=3))
    reg.create_tenant("globex", views=["no-cyber"])
    key_id, secret = reg.create_key("acme")
    statements = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(reg.engine, "before_cursor_execute", listener)
    context = reg.request_context(secret, "no-bio")
    event.remove(reg.engine, "before_cursor_execute", listener)
    assert len(statements) == 1  # one statement, no BEGIN or grant rows fetched one by one
    assert context.principal == reg.authenticate(secret)
    assert (context.principal.key_id, context.principal.tenant_name, context.principal.default_view) == (key_id, "acme", "no-bio")
    assert context.principal.views == frozenset({"original", "no-bio"})
    assert context.principal.limits == Limits(max_concurrent=3)
    assert (context.view, context.composed, context.experiment) == ("no-bio", reg.get_view("no-bio").composed, None)
    original = reg.request_context(secret, "original")
    assert (original.view, original.composed) == ("original", None)
    for variant in ("No-Bio", " no-bio", "no-bio ", "no_bio", "", "no-cyber", "ghost", None):
        assert reg.request_context(secret, variant).view is None, repr(variant)
    assert reg.request_context(secret).principal == context.principal

    arms = [{"name": "control", "view": "original", "weight": 1}, {"name": "forget", "view": "no-bio", "weight": 1}]
    created = reg.create_experiment("ab", alias="chat", tenants=["acme"], arms=arms, salt="s")
    routed = reg.request_context(secret, "chat")
    assert routed.experiment == created and routed.view is None
    assert reg.request_context(secret, "Chat").experiment is None
    reg.update_experiment("ab", status="paused")
    assert reg.request_context(secret, "chat").experiment.status == "paused"
    reg.update_experiment("ab", status="stopped")
    assert reg.request_context(secret, "chat").experiment is None
    globex_secret = reg.create_key("globex")[1]
    assert reg.request_context(globex_secret, "no-bio").view is None
    assert reg.request_context(globex_secret, "no-cyber").principal.default_view is None

    reg.set_default_view("acme", "original")
    reg.revoke_view("acme", "no-bio")
    after = reg.request_context(secret, "no-bio")
    assert after.view is None and after.principal.views == frozenset({"original"})
    assert after.principal.default_view == "original"
    reg.set_disabled("acme", True)
    assert reg.request_context(secret, "original") is None
    reg.set_disabled("acme", False)
    reg.revoke_key(key_id)
    assert reg.request_context(secret, "original") is None
    _, admin = reg.create_key(None, "admin")
    admin_context = reg.request_context(admin, "original")
    assert admin_context.principal.is_admin and admin_context.view is None and admin_context.experiment is None
    for wrong in (None, "", "as-", secret + "x", 42):
        assert reg.request_context(wrong, "original") is None

# ---- experiments ----------------------------------------------------------------------------------


def test_experiment_crud(alpha):
    reg = alpha
    reg.create_tenant("acme", views=["original", "no-bio"])
    reg.create_tenant("globex", views=["original", "no-bio"])
    reg.create_tenant("initech", views=["original"])
    secrets = {tenant: reg.create_key(tenant)[1] for tenant in ("acme", "globex", "initech")}

    def experiment_for(tenant: str, alias: str):
        """The experiment a request of `tenant` for model `alias` is routed through (request path)."""
        return reg.request_context(secrets[tenant], alias).experiment

    arms = [{"name": "control", "view": "original", "weight": 3}, {"name": "forget", "view": "no-bio", "weight": 1}]
    created = reg.create_experiment("bio-ab", alias="chat", tenants=["acme", "globex"], arms=arms,
                                    sticky="header:X-User", salt="fixed")
    assert (created.alias, created.tenants, created.sticky, created.salt, created.status, created.control_arm) == (
        "chat", ("acme", "globex"), "header:x-user", "fixed", "running", "control")
    assert [(a.name, a.view, a.weight) for a in created.arms] == [("control", "original", 3.0), ("forget", "no-bio", 1.0)]
    assert experiment_for("acme", "chat") == created
    assert experiment_for("acme", "Chat") is None and experiment_for("initech", "chat") is None

    with pytest.raises(Conflict, match="experiment 'bio-ab' already takes over model name 'chat' for tenant 'acme'"):
        reg.create_experiment("bio-ab-2", alias="chat", tenants=["acme"], arms=arms)
    with pytest.raises(InvalidInput) as caught:
        reg.create_experiment("bad", alias="x", tenants=["acme"], control_arm="nope",
                              arms=[{"name": "a", "view": "original", "weight": 0},
                                    {"name": "a", "view": "original", "weight": 0}])
    assert caught.value.problems == ["arm names must be unique; repeated: ['a']", "arm weights must not all be zero",
                                     "control arm 'nope' is not one of the arms ['a', 'a']"]
    with pytest.raises(InvalidInput, match="arm 0: weight"):
        reg.create_experiment("bad", alias="x", tenants=["acme"], arms=[{"name": "a", "view": "original", "weight": -1}])
    with pytest.raises(NotFound, match=r"view\(s\) \['ghost'\] not found"):
        reg.create_experiment("bad", alias="x", tenants=["acme"], arms=[{"name": "a", "view": "ghost", "weight": 1}])
    with pytest.raises(InvalidInput, match="sticky key 'cookie'"):
        reg.create_experiment("bad", alias="x", tenants=["acme"], arms=arms, sticky="cookie")
    assert [e.name for e in reg.list_experiments()] == ["bio-ab"]

    paused = reg.update_experiment("bio-ab", status="paused")
    assert {paused.choose_arm(f"u{i}").name for i in range(200)} == {"control"}
    reweighted = reg.update_experiment("bio-ab", arms=[{**arms[0], "weight": 1}, arms[1]], status="running")
    assert reweighted.salt == "fixed" and [a.weight for a in reweighted.arms] == [1.0, 1.0]
    assert reg.update_experiment("bio-ab", tenants=["globex"]).tenants == ("globex",)
    assert experiment_for("acme", "chat") is None
    reg.update_experiment("bio-ab", status="stopped")
    assert experiment_for("globex", "chat") is None
    second = reg.create_experiment("bio-ab-2", alias="chat", tenants=["globex"], arms=arms)
    assert second.salt != "fixed" and experiment_for("globex", "chat").name == "bio-ab-2"
    with pytest.raises(Conflict, match="already takes over model name 'chat'"):
        reg.update_experiment("bio-ab", status="running")
    assert [e.name for e in reg.list_experiments(status="running")] == ["bio-ab-2"]
    reg.delete_experiment("bio-ab")
    with pytest.raises(NotFound, match="experiment 'bio-ab' not found"):
        reg.get_experiment("bio-ab")


def test_experiment_arms_must_be_granted_to_its_tenants(alpha):
    """An unstopped experiment serves its arms' views through its alias, so every tenant must be
    granted every arm's view: checked on create, on every update that could break it, and on revoke."""
    reg = alpha
    reg.create_tenant("acme", views=["original"])
    reg.create_tenant("globex", views=["original", "no-bio"])
    arms = [{"name": "control", "view": "original", "weight": 1}, {"name": "forget", "view": "no-bio", "weight": 1},
            {"name": "cyber", "view": "no-cyber", "weight": 1}]
    with pytest.raises(InvalidInput, match="would serve its tenants views they are not granted") as caught:
        reg.create_experiment("ab", alias="chat", tenants=["globex", "acme"], arms=arms)
    assert caught.value.problems == ["tenant 'acme' is not granted view 'no-bio'",
                                     "tenant 'acme' is not granted view 'no-cyber'",
                                     "tenant 'globex' is not granted view 'no-cyber'"]
    assert reg.list_experiments() == []

    # Stopped, it serves nothing, so it may wait for its grants; starting it is checked.
    reg.create_experiment("ab", alias="chat", tenants=["globex"], arms=arms[:2], status="stopped")
    with pytest.raises(InvalidInput, match="tenant 'globex' is not granted view 'no-cyber'"):
        reg.update_experiment("ab", arms=arms, status="paused")
    assert reg.update_experiment("ab", status="running").status == "running"
    with pytest.raises(InvalidInput, match="tenant 'globex' is not granted view 'no-cyber'"):
        reg.update_experiment("ab", arms=arms)
    with pytest.raises(InvalidInput, match="tenant 'acme' is not granted view 'no-bio'"):
        reg.update_experiment("ab", tenants=["globex", "acme"])
    after = reg.get_experiment("ab")
    assert (after.tenants, len(after.arms)) == (("globex",), 2)  # the refused updates changed nothing
    assert reg.update_experiment("ab", tenants=["globex", "globex"]).tenants == ("globex",)  # deduplicated

    # While it runs (or is paused) its tenants keep its views; stopped, they can be revoked.
    for status in ("running", "paused"):
        reg.update_experiment("ab", status=status)
        with pytest.raises(Conflict, match=r"view 'no-bio' is an arm of experiment\(s\) \['ab'\] of tenant 'globex'"):
            reg.revoke_view("globex", "no-bio")
    reg.revoke_view("acme", "original")  # acme is not in the experiment
    reg.update_experiment("ab", status="stopped")
    assert reg.revoke_view("globex", "no-bio").views == ("original",)


def test_update_tenant_applies_a_patch_in_one_transaction(alpha):
    reg = alpha
    reg.create_tenant("acme", views=["original"], default_view="original")
    # grants first, then the default, then revokes: one call moves the tenant to a new view.
    moved = reg.update_tenant("acme", grant=["no-bio"], default_view="no-bio", revoke=["original"],
                              limits=Limits(max_concurrent=2), disabled=True)
    assert (moved.views, moved.default_view, moved.limits.max_concurrent, moved.disabled) == (
        ("no-bio",), "no-bio", 2, True)
    # All or nothing: a failing revoke leaves the grant (and everything else) undone.
    with pytest.raises(NotFound, match="has no grant for view 'original'"):
        reg.update_tenant("acme", grant=["no-cyber"], revoke=["original"], limits=Limits(), disabled=False)
    assert reg.get_tenant("acme") == moved
    with pytest.raises(Conflict, match="default view of tenant 'acme'"):
        reg.update_tenant("acme", grant=["original"], revoke=["no-bio"])
    with pytest.raises(InvalidInput, match="view 'no-cyber' is not granted to tenant 'acme'"):
        reg.update_tenant("acme", default_view="no-cyber")
    with pytest.raises(NotFound, match=r"view\(s\) \['ghost'\] not found"):
        reg.update_tenant("acme", grant=["original", "ghost"])
    assert reg.get_tenant("acme") == moved
    # UNCHANGED (the default) leaves the default view; None clears it.
    assert reg.update_tenant("acme", grant=["original"]).default_view == "no-bio"
    cleared = reg.update_tenant("acme", default_view=None, revoke=["no-bio"])
    assert (cleared.default_view, cleared.views) == (None, ("original",))


def test_out_of_range_numbers_are_refused_not_overflowed(alpha):
    reg = alpha
    for key_id in (10**20, 2**31, 0, -1):
        with pytest.raises(NotFound, match=f"API key {key_id} not found"):
            reg.revoke_key(key_id)
    for field in ("max_concurrent", "tokens_per_minute", "max_tokens_cap"):
        with pytest.raises(ValueError, match="less than or equal to 2147483647"):
            Limits(**{field: 2**31})
        assert getattr(Limits(**{field: 2**31 - 1}), field) == 2**31 - 1
    reg.create_tenant("acme", views=["original", "no-bio"])
    with pytest.raises(InvalidInput, match=r"arm weights must be at most 1e\+06 .*too large: \['a', 'b'\]"):
        reg.create_experiment("ab", alias="chat", tenants=["acme"], arms=[
            {"name": "a", "view": "original", "weight": 1e308}, {"name": "b", "view": "no-bio", "weight": 1e308}])
    reg.create_experiment("ab", alias="chat", tenants=["acme"], arms=[
        {"name": "a", "view": "original", "weight": 1e6}, {"name": "b", "view": "no-bio", "weight": 1e6}])
    with pytest.raises(InvalidInput, match="samples 2147483648 must be an integer from 0 to 2147483647"):
        reg.record_probe_results("ab", [{"arm": "a", "view": "original", "samples": 2**31, "metrics": {"x": 1.0}}])


def test_a_limit_stored_before_the_bound_still_reads(sqlite_reg):
    """SQLite stores 64-bit integers: a tenant limited to more than 2**31 - 1 before the bound existed
    must still authenticate (limits read back are not validated again)."""
    reg = sqlite_reg
    reg.create_tenant("acme", views=["original"])
    _, secret = reg.create_key("acme")
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE tenants SET tokens_per_minute = :big"), {"big": 2**40})
    assert reg.authenticate(secret).limits.tokens_per_minute == 2**40
    assert reg.get_tenant("acme").limits.tokens_per_minute == 2**40


def test_find_key_explains_a_key_that_does_not_authenticate(reg):
    reg.create_tenant("acme", views=["original"])
    key_id, secret = reg.create_key("acme")
    reg.set_disabled("acme", True)
    reg.revoke_key(key_id)
    found = reg.find_key(secret)
    assert reg.authenticate(secret) is None
    assert (found.id, found.tenant, found.role, found.active) == (key_id, "acme", "tenant", False)
    assert reg.find_key(secret + "x") is None and reg.find_key("not-a-key") is None


# ---- request log, feedback, results ---------------------------------------------------------------


def test_log_requests_is_one_executemany_and_feeds_results(alpha):
    reg = alpha
    reg.create_tenant("acme", views=["original", "no-bio"])
    reg.create_tenant("globex", views=["original"])
    reg.create_experiment("bio-ab", alias="chat", tenants=["acme"],
                          arms=[{"name": "control", "view": "original", "weight": 1},
                                {"name": "forget", "view": "no-bio", "weight": 1}])
    version = reg.get_view("no-bio").content_hash
    rows = [
        RequestLogEntry("r1", "acme", "chat", "original", 200, 100.0, None, "bio-ab", "control", 20.0, 10, 5),
        RequestLogEntry("r2", "acme", "chat", "original", 500, 300.0, None, "bio-ab", "control", None, 10, 0),
        RequestLogEntry("r3", "acme", "chat", "no-bio", 200, 50.0, version, "bio-ab", "forget", 10.0, 7, 3),
        {"response_id": "r4", "tenant": "globex", "model": "original", "view": "original", "status_code": 200,
         "latency_ms": 5.0},
    ]
    statements = []
    event.listen(reg.engine, "before_cursor_execute",
                 lambda conn, cur, stmt, params, ctx, many: statements.append((stmt.split()[0], many)))
    assert reg.log_requests(rows) == 4
    assert statements.count(("INSERT", True)) == 1 and ("INSERT", False) not in statements
    assert reg.log_requests([]) == 0
    with pytest.raises(InvalidInput, match="request log entry 0"):
        reg.log_requests([{"response_id": "r5", "bogus": 1}])

    feedback = reg.record_feedback("acme", "r3", 4.5, comment="good")
    assert (feedback.experiment, feedback.arm, feedback.view, feedback.rating) == ("bio-ab", "forget", "no-bio", 4.5)
    assert feedback.attributed
    reg.record_feedback("acme", "r1", 2)
    with pytest.raises(NotFound, match="response 'r4' not found for tenant 'acme'"):
        reg.record_feedback("acme", "r4", 1.0)
    with pytest.raises(InvalidInput, match="must be a finite number"):
        reg.record_feedback("acme", "r1", float("nan"))
    # A response another replica served and has not logged yet: stored, attributed once it is logged.
    unlogged = reg.record_feedback("acme", "later", 3.0)
    assert (unlogged.attributed, unlogged.experiment, unlogged.arm) == (False, None, None)
    assert [f.response_id for f in reg.list_feedback(experiment="bio-ab")] == ["r1", "r3"]
    assert [(a.requests, a.feedback_count) for a in reg.experiment_results("bio-ab")] == [(2, 1), (1, 1)]
    reg.log_requests([RequestLogEntry("later", "acme", "chat", "no-bio", 200, 70.0, version, "bio-ab", "forget")])
    assert [(f.response_id, f.arm, f.attributed) for f in reg.list_feedback(experiment="bio-ab")] == [
        ("later", "forget", True), ("r1", "control", True), ("r3", "forget", True)]

    control, forget = reg.experiment_results("bio-ab")
    assert (control.arm, control.view, control.requests, control.errors) == ("control", "original", 2, 1)
    assert control.mean_latency_ms == pytest.approx(200.0) and control.mean_ttft_ms == pytest.approx(20.0)
    assert (control.prompt_tokens, control.completion_tokens) == (20, 5)
    assert (control.feedback_count, control.mean_rating) == (1, 2.0)
    assert (forget.arm, forget.view, forget.requests, forget.errors) == ("forget", "no-bio", 2, 0)
    assert (forget.feedback_count, forget.mean_rating) == (2, pytest.approx(3.75))


# ---- concurrency ----------------------------------------------------------------------------------


def test_concurrent_reads_and_writes_from_a_thread_pool(reg):
    reg.create_tenant("acme", views=["original"])
    _, secret = reg.create_key("acme")
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        try:
            if i % 3 == 0:
                reg.create_tenant(f"t{i}", views=["original"])
                reg.create_key(f"t{i}")
            elif i % 3 == 1:
                reg.log_requests([RequestLogEntry(f"r{i}", "acme", "original", "original", 200, 1.0)] * 5)
            else:
                assert reg.authenticate(secret).tenant_name == "acme"
        except BaseException as exc:  # collected and reported below
            with lock:
                errors.append(exc)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(work, range(90)))
    assert errors == []
    assert len(reg.list_tenants()) == 1 + 30
    assert len(reg.list_keys()) == 1 + 30


def test_in_memory_database_for_tests(tmp_path):
    registry = Registry("sqlite://", tmp_path / "data", base_fingerprint=FINGERPRINT, base_shapes=BASE_SHAPES)
    registry.create_all()
    registry.store_bundle("alpha", write_bundle(make_bundle(0), tmp_path / "src"))
    registry.define_view(View(name="no-bio", forget={"bio": 1.0}), "alpha")
    registry.create_tenant("acme", views=["no-bio"], default_view="no-bio")
    context = registry.request_context(registry.create_key("acme")[1], "no-bio")
    assert context.view == "no-bio" and context.composed.content_hash == registry.get_view("no-bio").content_hash
    registry.close()


def test_switching_to_wal_retries_while_another_opener_holds_the_lock() -> None:
    """SQLite can refuse the WAL switch with "database is locked" without waiting (replicas opening
    a fresh registry together); the switch is retried, and any other error is raised at once."""
    import sqlite3

    from alter_serve.registry.database import _enable_wal

    class Cursor:
        def __init__(self, errors: list[str]):
            self.errors, self.calls = errors, 0

        def execute(self, sql: str) -> None:
            self.calls += 1
            if self.errors:
                raise sqlite3.OperationalError(self.errors.pop(0))

    locked = Cursor(["database is locked", "database is locked"])
    _enable_wal(locked)
    assert locked.calls == 3
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        _enable_wal(Cursor(["disk I/O error"]))
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _enable_wal(Cursor(["database is locked"] * 1000), timeout_s=0.1)
