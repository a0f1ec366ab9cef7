"""The model registry: import, list, show, promote, rollback, export, and every bad bundle refused.

Versions are copies of the tiny session bundle (64 px networks) with their own name and version in
the manifest: distinct registered versions that take a second to check.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from node.audit import AuditTrail
from pleura.cli import app
from model_versions import make_version
from services import write_config
from config.settings import load_settings
from contract.active import RegistryError, active_bundle_dir, validate_bundle
from contract.bundle import BundleError, Thresholds
from training.registry import Registry, open_registry


@pytest.fixture
def storage(tmp_path) -> Path:
    return tmp_path / "storage"


@pytest.fixture
def config(tmp_path, storage) -> Path:
    return write_config(tmp_path / "pleura.toml", storage_dir=storage, device="cpu")


@pytest.fixture
def registry(storage) -> Registry:
    return Registry(storage / "models")


def run(config: Path, *args: str, code: int = 0):
    result = CliRunner().invoke(app, [*args, "--config", str(config)], env={"COLUMNS": "250"})
    assert result.exit_code == code, result.output
    return result.output


def test_import_list_show_promote_rollback_export_round_trip(tmp_path, tiny_base_bundle, config, storage, registry):
    a = make_version(tiny_base_bundle, tmp_path / "a", "1.0")
    b = make_version(tiny_base_bundle, tmp_path / "b", "2.0")
    settings = load_settings(config)
    assert active_bundle_dir(settings) == storage / "models" / "demo"  # nothing promoted: the demo bundle

    out = run(config, "models", "import", str(a))
    assert "imported tiny/1.0" in out
    run(config, "models", "import", str(b))
    assert "already registered" in run(config, "models", "import", str(b))
    listed = run(config, "models", "list")
    assert "tiny/1.0" in listed and "tiny/2.0" in listed and "demo bundle" in listed

    run(config, "models", "promote", "tiny/1.0", "--reason", "first")
    assert active_bundle_dir(settings) == storage / "models" / "versions" / "tiny" / "1.0"
    run(config, "models", "promote", "2.0")  # a version alone, when only one name has it
    assert active_bundle_dir(settings).name == "2.0"

    shown = run(config, "models", "show", "tiny/2.0")
    assert '"version": "2.0"' in shown and "intact" in shown and "active" in shown
    assert str(a.resolve()) not in shown and str(b.resolve()) in shown  # provenance: imported from

    run(config, "models", "rollback")
    assert active_bundle_dir(settings).name == "1.0"
    missing = run(config, "models", "rollback", code=2)  # to the demo bundle, which is not built here
    assert "demo/manifest.json is missing" in missing and active_bundle_dir(settings).name == "1.0"
    make_version(tiny_base_bundle, storage / "models" / "demo", "0-demo", name="demo")
    assert "not a registered version" in run(config, "models", "show", "demo/0-demo", code=2)
    run(config, "models", "rollback", "--reason", "back to the demo")
    assert active_bundle_dir(settings) == storage / "models" / "demo"
    refused = run(config, "models", "rollback", code=2)
    assert "nothing to roll back to" in refused
    history = [(e.action, e.from_version, e.to_version) for e in registry.read().history]
    assert history == [
        ("promote", None, "tiny/1.0"), ("promote", "tiny/1.0", "tiny/2.0"),
        ("rollback", "tiny/2.0", "tiny/1.0"), ("rollback", "tiny/1.0", None),
    ]
    assert registry.read().history[0].reason == "first"
    audited = [(e["event"], e.get("to_version", e.get("version"))) for e in AuditTrail(storage).events()]
    assert audited == [
        ("model_imported", "tiny/1.0"), ("model_imported", "tiny/2.0"), ("model_promoted", "tiny/1.0"),
        ("model_promoted", "tiny/2.0"), ("model_rolled_back", "tiny/1.0"), ("model_rolled_back", None),
    ]

    # Export to an archive and to a folder; each imports elsewhere with the same files and the
    # provenance it had here.
    archive = tmp_path / "out" / "tiny-2.0.tar.gz"
    run(config, "models", "export", "tiny/2.0", str(archive))
    folder = tmp_path / "out" / "tiny-2.0"
    run(config, "models", "export", "tiny/2.0", str(folder))
    original = registry.find("tiny/2.0")
    for n, source in enumerate((archive, folder)):
        other = Registry(tmp_path / f"elsewhere-{n}")
        record, added = other.import_bundle(source)
        assert added and record.id == "tiny/2.0" and record.files == original.files
        assert record.provenance.earlier[-1]["imported_from"] == original.provenance.imported_from
        assert record.provenance.imported_from == str(source.resolve())
        assert other.verify(record) == []
        other.promote("tiny/2.0")
        assert other.active("radiograph").id == "tiny/2.0"


def test_a_promotion_through_the_registry_itself_is_audited(tmp_path, tiny_base_bundle, config, storage):
    """Not only the commands: whatever changes the registry (a script, another service) leaves the
    same audit records as `pleura models`, in the storage's audit trail."""
    registry = open_registry(load_settings(config))
    registry.import_bundle(make_version(tiny_base_bundle, tmp_path / "a", "1.0"), by="script@host")
    registry.import_bundle(make_version(tiny_base_bundle, tmp_path / "b", "2.0"), by="script@host")
    registry.promote("tiny/1.0", by="script@host", reason="direct")
    assert registry.promote("tiny/1.0") is None  # already active: nothing changed, nothing recorded
    registry.promote("tiny/2.0", by="script@host")
    registry.rollback("radiograph", by="script@host", reason="back")
    events = AuditTrail(storage).events()
    assert [(e["event"], e.get("to_version", e.get("version"))) for e in events] == [
        ("model_imported", "tiny/1.0"), ("model_imported", "tiny/2.0"), ("model_promoted", "tiny/1.0"),
        ("model_promoted", "tiny/2.0"), ("model_rolled_back", "tiny/1.0"),
    ]
    promoted = events[2]
    assert promoted["kind"] == "radiograph" and promoted["action"] == "promote" and promoted["from_version"] is None
    assert promoted["by"] == "script@host" and promoted["reason"] == "direct" and promoted["at"]
    assert events[0]["source"] == str(tmp_path / "a") and events[0]["by"] == "script@host"
    assert events[4]["from_version"] == "tiny/2.0" and events[4]["reason"] == "back"

    # A Registry made on its own folder under the storage directory writes to the same trail.
    Registry(storage / "models").promote("tiny/2.0", by="other@host")
    assert AuditTrail(storage).events()[-1]["event"] == "model_promoted"
    assert AuditTrail(storage).events()[-1]["by"] == "other@host"


def test_a_version_never_changes_and_a_fixed_bundle_is_not_a_registry(
    tmp_path, tiny_base_bundle, ct_demo_bundle, registry
):
    registry.import_bundle(make_version(tiny_base_bundle, tmp_path / "a", "1.0"))
    other = make_version(tiny_base_bundle, tmp_path / "a2", "1.0", thresholds=Thresholds(probability=0.9))
    with pytest.raises(BundleError, match="already registered with other files"):
        registry.import_bundle(other)

    fixed = load_settings(storage_dir=tmp_path / "s", model_bundle_dir=tiny_base_bundle)
    assert active_bundle_dir(fixed) == tiny_base_bundle
    # beside a fixed radiograph bundle, CT series go to the CT demo bundle or PLEURA_CT_MODEL_DIR
    assert active_bundle_dir(fixed, "ct") == (tmp_path / "s" / "models" / "ct-demo").resolve()
    ct_fixed = load_settings(storage_dir=tmp_path / "s", model_bundle_dir=tiny_base_bundle, ct_model_dir=tmp_path / "ct")
    assert active_bundle_dir(ct_fixed, "ct") == (tmp_path / "ct").resolve()
    fixed_ct = make_version(ct_demo_bundle, tmp_path / "fixed-ct", "1.0", name="tiny-ct")
    with pytest.raises(RegistryError, match="no radiograph model"):
        active_bundle_dir(load_settings(storage_dir=tmp_path / "s", model_bundle_dir=fixed_ct), "radiograph")
    config = write_config(tmp_path / "fixed.toml", storage_dir=tmp_path / "s", model_bundle_dir=tiny_base_bundle)
    assert "names a single model bundle" in run(config, "models", "promote", "tiny/1.0", code=2)
    assert "is a single bundle" in run(config, "models", "list")


# --- bad bundles -----------------------------------------------------------------------------------


def _drop_manifest(root: Path) -> None:
    (root / "manifest.json").unlink()


def _bad_json(root: Path) -> None:
    (root / "manifest.json").write_text('{"name": "tiny", "version": ')


def _bad_schema(root: Path) -> None:
    data = json.loads((root / "manifest.json").read_text())
    del data["classifier"]
    (root / "manifest.json").write_text(json.dumps(data))


def _truncated_weights(root: Path) -> None:
    path = root / "classifier.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _other_architecture(root: Path) -> None:
    # The U-Net's state dict where the manifest says a DenseNet classifier is.
    shutil.copyfile(root / "segmenter.pt", root / "classifier.pt")


def _three_channels(root: Path) -> None:
    data = json.loads((root / "manifest.json").read_text())
    data["preprocessing"]["channels"] = 3  # the weights take one
    (root / "manifest.json").write_text(json.dumps(data))


def _tiny_grid(root: Path) -> None:
    data = json.loads((root / "manifest.json").read_text())
    data["classifier"]["extra"]["block_config"] = [2, 2, 2, 2, 2, 2]  # more poolings than a 64 px image has
    data["classifier"]["extra"]["init_features"] = 8
    (root / "manifest.json").write_text(json.dumps(data))
    from contract.bundle import Manifest
    from contract.networks import build_network

    manifest = Manifest.model_validate(data)
    torch.save(build_network(manifest.classifier, manifest.preprocessing).state_dict(), root / "classifier.pt")


BAD_BUNDLES = {
    "missing manifest": (_drop_manifest, r"bad/manifest\.json is missing"),
    "invalid JSON": (_bad_json, r"invalid manifest .*bad/manifest\.json"),
    "invalid schema": (_bad_schema, r"(?s)invalid manifest .*bad/manifest\.json.*classifier"),
    "truncated weights": (_truncated_weights, r"cannot read weights file .*bad/classifier\.pt"),
    "another architecture": (_other_architecture, r"bad/classifier\.pt does not fit the densenet121"),
    "another channel count": (_three_channels, r"bad/classifier\.pt does not fit the densenet121"),
    "another input grid": (_tiny_grid, r"classifier in .*classifier\.pt does not run on its input grid"),
}


@pytest.mark.parametrize("case", BAD_BUNDLES)
def test_a_bad_bundle_is_refused_with_its_reason_and_the_active_model_stays(
    case, tmp_path, tiny_base_bundle, config, registry
):
    registry.import_bundle(make_version(tiny_base_bundle, tmp_path / "good", "1.0"))
    registry.promote("tiny/1.0")
    before = registry.read()
    damage, reason = BAD_BUNDLES[case]
    bad = make_version(tiny_base_bundle, tmp_path / "bad", "9.9")
    damage(bad)

    out = run(config, "models", "import", str(bad), code=2)
    assert "Bundle refused" in out
    with pytest.raises(BundleError, match=reason):
        registry.import_bundle(bad)
    after = registry.read()
    assert after == before
    assert not (registry.root / "versions" / "tiny" / "9.9").exists()
    assert [p.name for p in (registry.root / "versions").iterdir()] == ["tiny"]  # no leftovers
    assert active_bundle_dir(load_settings(config)).name == "1.0"


def test_a_bundle_for_another_input_is_not_promoted_to_the_slot(
    tmp_path, tiny_base_bundle, ct_demo_bundle, config, registry
):
    registry.import_bundle(make_version(tiny_base_bundle, tmp_path / "xr", "1.0"))
    registry.promote("tiny/1.0")
    registry.import_bundle(make_version(ct_demo_bundle, tmp_path / "ct", "1.0", name="tiny-ct"))
    out = run(config, "models", "promote", "tiny-ct/1.0", "--kind", "radiograph", code=2)
    assert "made for another input" in out and "'ct'" in out and "manifest.json" in out
    assert registry.read().active == {"radiograph": "tiny/1.0"}
    run(config, "models", "promote", "tiny-ct/1.0")  # its own slot
    settings = load_settings(config)
    assert registry.read().active == {"radiograph": "tiny/1.0", "ct": "tiny-ct/1.0"}
    assert active_bundle_dir(settings, "ct").parent.name == "tiny-ct"
    assert active_bundle_dir(settings, "radiograph").parent.name == "tiny"


def test_a_version_changed_after_import_is_refused_and_shown(tmp_path, tiny_base_bundle, config, registry):
    registry.import_bundle(make_version(tiny_base_bundle, tmp_path / "a", "1.0"))
    registry.import_bundle(make_version(tiny_base_bundle, tmp_path / "b", "2.0"))
    registry.promote("tiny/1.0")
    weights = registry.root / "versions" / "tiny" / "2.0" / "segmenter.pt"
    weights.chmod(0o644)
    with open(weights, "ab") as handle:  # still a loadable file: only the checksum tells
        handle.write(b"\0")
    out = run(config, "models", "promote", "tiny/2.0", code=2)
    assert "checksum mismatch" in out and "segmenter.pt" in out and "active model is unchanged" in out
    assert registry.read().active == {"radiograph": "tiny/1.0"}
    shown = run(config, "models", "show", "tiny/2.0", code=1)
    assert "checksum mismatch" in shown
    assert "corrupted" in run(config, "models", "export", "tiny/2.0", str(tmp_path / "x.tar.gz"), code=2)


def test_an_export_damaged_in_transit_is_refused(tmp_path, tiny_base_bundle, registry):
    registry.import_bundle(make_version(tiny_base_bundle, tmp_path / "a", "1.0"))
    folder = registry.export("tiny/1.0", tmp_path / "export")
    thresholds = json.loads((folder / "manifest.json").read_text())
    thresholds["thresholds"]["probability"] = 0.01
    (folder / "manifest.json").write_text(json.dumps(thresholds))
    with pytest.raises(BundleError, match=r"damaged in transit.*manifest\.json"):
        Registry(tmp_path / "elsewhere").import_bundle(folder)

    archive = tmp_path / "not-a-bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_base_bundle / "classifier.pt", arcname="x/classifier.pt")
    with pytest.raises(BundleError, match="holds no manifest.json"):
        Registry(tmp_path / "elsewhere").import_bundle(archive)

    escaping = tmp_path / "escaping.tar.gz"
    with tarfile.open(escaping, "w:gz") as tar:
        tar.add(tiny_base_bundle / "manifest.json", arcname="../manifest.json")
    with pytest.raises(BundleError, match="cannot unpack"):
        Registry(tmp_path / "elsewhere").import_bundle(escaping)
    assert not (tmp_path / "elsewhere" / "manifest.json").exists()


def test_validation_runs_the_networks(tiny_base_bundle):
    bundle = validate_bundle(tiny_base_bundle, kind="radiograph")
    assert bundle.manifest.name == "tiny-base"
    with pytest.raises(BundleError, match="made for another input"):
        validate_bundle(tiny_base_bundle, kind="ct")


def test_tune_refuses_to_change_a_registered_version_in_place(tmp_path, tiny_base_bundle, config, registry):
    a = make_version(tiny_base_bundle, tmp_path / "a", "1.0")
    run(config, "models", "import", str(a))
    registered = registry.version_dir(registry.find("tiny/1.0"))
    before = (registered / "manifest.json").read_bytes()
    from training.synthetic import write_siim_dataset

    data = write_siim_dataset(tmp_path / "data", 4, size=64, seed=1)
    out = run(config, "tune", "--model", str(registered), "--data", str(data), code=2)
    assert "registered version" in out and "--out" in out
    assert (registered / "manifest.json").read_bytes() == before
    assert registry.verify(registry.find("tiny/1.0")) == []
