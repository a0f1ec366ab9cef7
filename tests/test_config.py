"""The settings model: sources, precedence, errors that name the setting, documentation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from config.settings import Settings, SettingsError, load_settings
from contract.active import active_bundle_dir
from pleura.cli import app

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("PLEURA_"):
            monkeypatch.delenv(name)


def test_defaults_follow_the_design_brief(tmp_path, monkeypatch):
    monkeypatch.setenv("PLEURA_STORAGE_DIR", str(tmp_path))
    s = load_settings()
    assert (s.ae_title, s.host, s.port, s.device) == ("PLEURA", "0.0.0.0", 11112, "auto")
    assert s.ledger_url == f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    assert s.embedded_broker and s.celery_broker_url.startswith("sqla+sqlite:///")
    assert s.destinations == []
    assert active_bundle_dir(s) == tmp_path / "models" / "demo"


def test_environment_and_toml_file(tmp_path, monkeypatch):
    toml = tmp_path / "pleura.toml"
    toml.write_text(
        'ae_title = "FROMFILE"\nport = 4000\nsettle_seconds = 2.5\n'
        '[[destinations]]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n'
    )
    monkeypatch.setenv("PLEURA_PORT", "5000")  # the environment wins over the file
    s = load_settings(toml)
    assert s.ae_title == "FROMFILE" and s.port == 5000 and s.settle_seconds == 2.5
    assert s.destinations[0].label == "ORTHANC@127.0.0.1:4242"
    assert s.destinations[0].max_attempts == 10


def test_destinations_from_json_env(monkeypatch):
    monkeypatch.setenv("PLEURA_DESTINATIONS", '[{"ae_title": "PACS", "host": "pacs", "port": 104}]')
    assert load_settings().destinations[0].port == 104


@pytest.mark.parametrize(
    "env, value, named",
    [
        ("PLEURA_PORT", "abc", "PLEURA_PORT"),
        ("PLEURA_PORT", "70000", "PLEURA_PORT"),
        ("PLEURA_AE_TITLE", "A" * 17, "PLEURA_AE_TITLE"),
        ("PLEURA_DEVICE", "tpu", "PLEURA_DEVICE"),
        ("PLEURA_BROKER_URL", "localhost", "PLEURA_BROKER_URL"),
        ("PLEURA_DESTINATIONS", '[{"ae_title": "X", "host": "h", "port": 0}]', "PLEURA_DESTINATIONS"),
        ("PLEURA_SETTLE_SECONDS", "-1", "PLEURA_SETTLE_SECONDS"),
    ],
)
def test_a_wrong_value_names_the_setting(monkeypatch, env, value, named):
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert named in str(err.value)


def test_unknown_key_in_file_and_missing_file_are_named(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match="prot"):
        load_settings(toml)
    with pytest.raises(SettingsError, match="nowhere.toml"):
        load_settings(tmp_path / "nowhere.toml")


def test_cli_reports_a_bad_setting_and_exits_2(monkeypatch):
    monkeypatch.setenv("PLEURA_PORT", "abc")
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 2
    assert "PLEURA_PORT" in result.output


def test_every_setting_is_documented():
    text = DOCS.read_text()
    for name in Settings.model_fields:
        assert f"`PLEURA_{name.upper()}`" in text, f"{name} missing from docs/configuration.md"
        assert re.search(rf"\| `{name}` \|", text), f"key {name} missing from docs/configuration.md"


def test_worker_names_a_missing_model_bundle(tmp_path, monkeypatch):
    monkeypatch.setenv("PLEURA_MODEL_REGISTRY_DIR", str(tmp_path / "no-bundle"))
    result = CliRunner().invoke(app, ["worker"])
    assert result.exit_code == 2
    assert "manifest.json" in result.output and "pleura demo-model" in result.output


def test_demo_model_never_overwrites_a_trained_bundle(tmp_path, demo_bundle):
    import shutil

    trained = tmp_path / "trained"
    shutil.copytree(demo_bundle, trained)
    manifest = trained / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"synthetic_demo": true', '"synthetic_demo": false'))
    result = CliRunner().invoke(app, ["demo-model", "--out", str(trained)])
    assert result.exit_code == 2 and "trained model" in result.output
    assert '"synthetic_demo": false' in manifest.read_text()


# --- secrets are masked wherever they are printed or logged --------------------------------------

def test_config_masks_every_secret_and_says_where_each_value_came_from(tmp_path, monkeypatch):
    import json

    toml = tmp_path / "pleura.toml"
    toml.write_text('ae_title = "FROMTOML"\n')
    monkeypatch.setenv("PLEURA_STORAGE_DIR", str(tmp_path / "s"))
    monkeypatch.setenv("PLEURA_DATABASE_URL", "postgresql+psycopg://u:dbpass@db.example:5432/pleura")
    monkeypatch.setenv("PLEURA_BROKER_URL", "redis://:redispass@redis.example:6379/0")
    result = CliRunner().invoke(app, ["config", "--config", str(toml)])
    assert result.exit_code == 0, result.output
    assert "dbpass" not in result.output and "redispass" not in result.output
    shown = json.loads(result.stdout)
    assert shown["database_url"] == {"value": "postgresql+psycopg://u:***@db.example:5432/pleura",
                                     "source": "environment (PLEURA_DATABASE_URL)"}
    assert shown["broker_url"]["value"] == "redis://:***@redis.example:6379/0"
    assert shown["ae_title"] == {"value": "FROMTOML", "source": f"TOML file {toml}, key ae_title"}
    assert shown["port"] == {"value": 11112, "source": "default"}
    assert shown["model_dir"]["value"] == str((tmp_path / "s" / "models").resolve())  # in effect, not null


def test_readiness_details_error_messages_and_logs_mask_passwords(tmp_path, monkeypatch, capsys):
    import json
    import logging

    from node.logs import configure_logging
    from node.ops.health import Check, run_checks

    def failing() -> str:
        raise ConnectionError("cannot reach postgresql://u:dbpass@db.example/pleura")

    answer = run_checks([Check("database", failing), Check("broker", lambda: "redis://:redispass@r:6379/0")])
    assert "dbpass" not in json.dumps(answer) and "redispass" not in json.dumps(answer)
    assert "u:***@db.example" in answer["checks"]["database"]["detail"]

    monkeypatch.setenv("PLEURA_BROKER_URL", "redispass-without-scheme://")  # a bad value, quoted back
    monkeypatch.setenv("PLEURA_DATABASE_URL", "postgresql://u:dbpass@db.example/pleura")
    monkeypatch.setenv("PLEURA_PORT", "postgresql://u:dbpass@x/y")
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 2 and "PLEURA_PORT" in result.output and "dbpass" not in result.output

    configure_logging(logging.INFO, "json")
    try:
        logging.getLogger("pleura.test").error("database down: %s", "postgresql://u:dbpass@db/pleura")
    finally:
        logging.getLogger().handlers.clear()
    logged = capsys.readouterr().err
    assert "database down" in logged and "dbpass" not in logged and "u:***@db" in logged


# --- error messages name the setting, where it came from, and the fix ---------------------------

def test_a_cross_field_error_names_the_variables_not_an_empty_setting(tmp_path, monkeypatch):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    monkeypatch.setenv("PLEURA_TLS_CERT_FILE", str(cert))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "setting ''" not in str(caught.value) and "PLEURA_?" not in str(caught.value)
    assert "PLEURA_TLS_KEY_FILE" in str(caught.value)


def test_a_bad_toml_value_is_reported_as_the_toml_key(tmp_path):
    toml = tmp_path / "pleura.toml"
    toml.write_text('port = "abc"\n')
    with pytest.raises(SettingsError) as caught:
        load_settings(toml)
    assert f"TOML file {toml}, key port" in str(caught.value) and "env PLEURA_PORT" not in str(caught.value)


def test_malformed_json_in_an_environment_variable_names_it(monkeypatch):
    monkeypatch.setenv("PLEURA_DESTINATIONS", '[{"ae_title": "PACS",')
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 2
    assert "PLEURA_DESTINATIONS" in result.output and "not valid JSON" in result.output
    assert "EnvSettingsSource" not in result.output


def test_an_unknown_pleura_variable_is_warned_about_with_the_closest_setting(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PLEURA_STORAGE_DIR", str(tmp_path))
    monkeypatch.setenv("PLEURA_PORTT", "11113")
    with caplog.at_level("WARNING", logger="pleura.config"):
        load_settings()
    assert [r.getMessage() for r in caplog.records] == [
        "unknown variable PLEURA_PORTT is ignored: did you mean PLEURA_PORT?"]


def test_tokens_need_128_bits_in_plain_and_hashed_form():
    import hashlib

    from node.api.auth import Authenticator
    from node.ledger import Ledger

    with pytest.raises(SettingsError, match="api_users"):
        load_settings(api_users=[{"name": "a", "role": "read", "token": "sixteen-chars-xx"}])
    weak = hashlib.sha256(b"password").hexdigest()
    settings = load_settings(api_users=[{"name": "a", "role": "read", "token_sha256": weak}])
    assert Authenticator(settings.api_users, Ledger("sqlite://")).check_token("password") is None  # the hash matches, the token is too short
    strong = "k" * 22
    settings = load_settings(api_users=[{"name": "b", "role": "read", "token_sha256": hashlib.sha256(strong.encode()).hexdigest()}])
    assert Authenticator(settings.api_users, Ledger("sqlite://")).check_token(strong).name == "b"
    assert weak not in DOCS.read_text() and weak not in (DOCS.parent.parent / "README.md").read_text()


def test_worklist_site_settings_are_checked_with_the_fix_in_the_message(tmp_path):
    with pytest.raises(SettingsError, match="site_time_zone.*IANA time zone"):
        load_settings(storage_dir=tmp_path, site_time_zone="Mars/Olympus")
    with pytest.raises(SettingsError, match="pacs_viewer_url.*study_uid"):
        load_settings(storage_dir=tmp_path, pacs_viewer_url="https://pacs.example.org/viewer?uid={patient_id}")
    settings = load_settings(
        storage_dir=tmp_path, site_time_zone="Europe/Berlin", worklist_aging_minutes=30,
        pacs_viewer_url="https://pacs.example.org/ohif/viewer?StudyInstanceUIDs={study_uid}",
    )
    assert settings.site_time_zone == "Europe/Berlin" and settings.worklist_aging_minutes == 30


def test_the_old_model_dir_still_names_a_bundle_or_a_registry_and_warns_once(tmp_path, monkeypatch, caplog):
    """PLEURA_MODEL_DIR, deprecated, works as before: a folder with manifest.json is the fixed
    bundle, any other the registry; a warning says so once per process. The new names, one for
    each of those, take precedence over it."""
    import config.settings as settings_module
    from contract.active import fixed_bundle_dir, registry_root

    monkeypatch.setattr(settings_module, "_warned_model_dir", False)
    bundle, registry = tmp_path / "bundle", tmp_path / "registry"
    bundle.mkdir()
    (bundle / "manifest.json").write_text('{"kind": "radiograph"}')
    monkeypatch.setenv("PLEURA_STORAGE_DIR", str(tmp_path / "s"))
    with caplog.at_level("WARNING", logger="pleura.config"):
        monkeypatch.setenv("PLEURA_MODEL_DIR", str(bundle))
        old_bundle = load_settings()
        monkeypatch.setenv("PLEURA_MODEL_DIR", str(registry))
        old_registry = load_settings()
    assert active_bundle_dir(old_bundle) == bundle.resolve() and registry_root(old_bundle) is None
    assert fixed_bundle_dir(old_registry) is None and registry_root(old_registry) == registry.resolve()
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "PLEURA_MODEL_DIR" in warned[0] and "PLEURA_MODEL_BUNDLE_DIR" in warned[0], warned

    monkeypatch.delenv("PLEURA_MODEL_DIR")
    new_bundle = load_settings(model_bundle_dir=bundle)
    assert active_bundle_dir(new_bundle) == bundle.resolve() and registry_root(new_bundle) is None
    assert registry_root(load_settings(model_registry_dir=registry)) == registry.resolve()
    both = load_settings(model_dir=bundle, model_registry_dir=registry)
    assert fixed_bundle_dir(both) is None and registry_root(both) == registry.resolve()
