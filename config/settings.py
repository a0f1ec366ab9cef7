"""Pleura's one typed settings model.

Values come, highest priority first, from keyword arguments, ``PLEURA_*`` environment variables,
an optional TOML file (``--config FILE`` or ``PLEURA_CONFIG``) and the defaults below. The names
are a public interface: ``docs/configuration.md`` lists every one.

The models of the settings' structured values live beside this one: where results and notifications
go in ``config/destinations.py``, who may call Pleura (and the AE title rule) in ``config/callers.py``;
what `pleura config` shows of them in ``config/describe.py``.
"""

from __future__ import annotations

import logging
import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from platformdirs import user_data_dir
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from config.callers import AllowedCaller, ApiUser, check_ae_title
from config.destinations import RESULT_OBJECTS, AnyDestination, FhirEndpoint, Hl7Destination, Webhook
from config.errors import PleuraError
from config.secrets import mask_text

ENV_PREFIX = "PLEURA_"
CONFIG_FILE_ENV = "PLEURA_CONFIG"

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

DEFAULT_CHEST_BODY_PARTS: tuple[str, ...] = ("CHEST", "THORAX", "TORAX", "THORAKS", "TORACE", "BRUST", "LUNG", "LUNGS")
"""Words that name the chest in Body Part Examined or a description ("PORT CHEST", "TORAX AP")."""
DEFAULT_NON_CHEST_TERMS: tuple[str, ...] = (
    "SPINE", "TSPINE", "CSPINE", "LSPINE", "RIB", "RIBS", "STERNUM", "CLAVICLE", "SCAPULA", "SHOULDER",
    "HUMERUS", "ABDOMEN", "ABD", "PELVIS", "SKULL", "EXTREMITY", "HAND", "KNEE", "FOOT", "BREAST",
)
"""Words that make a body part or description something other than a chest film ("THORACIC SPINE")."""
DEFAULT_FRONTAL_VIEW_TERMS: tuple[str, ...] = ("PA", "AP", "FRONTAL", "POSTERO ANTERIOR", "ANTERO POSTERIOR")
"""Words that name a frontal view in View Position, a view code's meaning or a description."""
DEFAULT_LATERAL_VIEW_TERMS: tuple[str, ...] = ("LL", "RL", "LAT", "LATERAL", "LATERALE", "SEITLICH")
"""Words that name a lateral view."""


# The TOML file of the load_settings() call in progress (the settings sources cannot take arguments).
_config_file: ContextVar[str | None] = ContextVar("pleura_config_file", default=None)


class SettingsError(PleuraError, ValueError):
    """A setting has a wrong value; the message names the setting and the fix."""


class StorageDirError(PleuraError, OSError):
    """The storage directory (``PLEURA_STORAGE_DIR``) cannot be made or used; every process needs it."""

    @classmethod
    def from_os_error(cls, storage_dir: Path, exc: OSError) -> StorageDirError:
        return cls(
            f"the storage directory {storage_dir} cannot be made: {exc.strerror or exc}"
            f"{f' ({exc.filename})' if exc.filename and str(exc.filename) != str(storage_dir) else ''}: "
            "set PLEURA_STORAGE_DIR to a folder this user can create and write"
        )


_warned_model_dir = False


def _warn_deprecated_model_dir(*, newer: bool) -> None:
    """Once per process: ``model_dir`` still works as before, but names two things."""
    global _warned_model_dir
    if _warned_model_dir:
        return
    _warned_model_dir = True
    logging.getLogger("pleura.config").warning(
        "model_dir (PLEURA_MODEL_DIR) is deprecated: %s",
        "it is ignored, as model_registry_dir or model_bundle_dir is set"
        if newer
        else "set model_registry_dir (PLEURA_MODEL_REGISTRY_DIR) for a registry or model_bundle_dir "
        "(PLEURA_MODEL_BUNDLE_DIR) for one bundle",
    )


def default_storage_dir() -> Path:
    return Path(user_data_dir("pleura", appauthor=False))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        env_nested_delimiter=None,
    )

    ae_title: str = Field(default="PLEURA", description="the node's AE title")
    host: str = Field(default="0.0.0.0", description="address the DICOM SCP listens on")
    port: int = Field(default=11112, ge=1, le=65535, description="port the DICOM SCP listens on")
    storage_dir: Path = Field(
        default_factory=default_storage_dir,
        description="received instances, results, quarantine, embedded broker",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the ledger; unset = SQLite file in the storage dir"
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker (redis://host:6379/0); unset = embedded broker in the storage dir"
    )
    destinations: list[AnyDestination] = Field(
        default_factory=list,
        description='JSON list of {"ae_title", "host", "port"} (C-STORE) or {"kind": "dicomweb", "url"} (STOW-RS) '
        "receiving results",
    )
    model_registry_dir: Path | None = Field(
        default=None, description="the model registry directory; unset = the registry <storage_dir>/models"
    )
    model_bundle_dir: Path | None = Field(
        default=None,
        description="one model bundle directory (with manifest.json): the fixed model, in place of the registry "
        "(model_registry_dir is then not used)",
    )
    model_dir: Path | None = Field(
        default=None,
        description="deprecated, the old name of both: a bundle directory when it holds manifest.json, else the "
        "registry; model_registry_dir and model_bundle_dir take precedence",
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    settle_seconds: float = Field(default=5.0, ge=0, le=3600, description="quiet time before a study is analysed")
    settle_grace_ms: int = Field(
        default=300, ge=0, le=60_000,
        description="a study whose sending association was released normally is analysed once nothing more "
        "arrived for this long (the quiet time stays for senders that keep their association open)",
    )
    stat_calling_aes: list[str] = Field(
        default_factory=list,
        description="calling AE titles whose studies are urgent (the STAT queue, served first), as are "
        "C-STOREs with Priority HIGH",
    )
    _stat_aes = field_validator("stat_calling_aes")(
        classmethod(lambda cls, v: [check_ae_title(title) for title in v])
    )
    broker_polling_ms: int = Field(
        default=100, ge=5, le=5000,
        description="how often the embedded broker's consumers look for a new message (node, export worker, workers)",
    )
    analysis_timeout_seconds: float = Field(
        default=3600.0, gt=0, description="a study queued this long without a result is dispatched again"
    )
    analysis_lease_seconds: float = Field(
        default=20.0, ge=2, le=3600,
        description="a running analysis that sends no heartbeat for this long (its worker was killed) is taken back "
        "and dispatched again; its worker beats every quarter of it",
    )
    reanalyse_hours_on_promote: float = Field(
        default=0.0, ge=0, le=24 * 365,
        description="when a radiograph model is promoted or rolled back, re-analyse the studies received in the "
        "last N hours with it (0: none)",
    )
    max_pdu: int = Field(
        default=65536, ge=0,
        description="maximum PDU size received (longer P-DATA PDUs abort the association); 0 = unlimited, so that "
        "a sender may put a whole instance in one PDU, held in memory",
    )
    allowed_callers: list[AllowedCaller] = Field(
        default_factory=list,
        description='JSON list of {"ae_title", "hosts"} allowed to associate; empty = any calling AE',
    )
    max_associations: int = Field(
        default=16, ge=1, le=1000, description="simultaneous associations; more are rejected (transient)"
    )
    acse_timeout: float = Field(default=30.0, gt=0, description="seconds to wait for association messages")
    dimse_timeout: float = Field(default=60.0, gt=0, description="seconds to wait for a DIMSE message")
    network_timeout: float = Field(
        default=120.0, gt=0, description="seconds an association may stay silent before it is aborted"
    )
    association_request_timeout: float = Field(
        default=10.0, gt=0,
        description="seconds from the connect within which the A-ASSOCIATE-RQ (and the TLS handshake) must "
        "have arrived whole; bytes trickled in do not extend it",
    )
    pdu_timeout: float = Field(
        default=30.0, gt=0, description="seconds from a PDU's first byte within which it must have arrived whole"
    )
    store_timeout: float = Field(
        default=600.0, gt=0,
        description="seconds from a DIMSE message's first fragment within which it (a C-STORE with its data set) "
        "must have arrived whole",
    )
    max_associations_per_address: int = Field(
        default=8, ge=0, le=1000,
        description="connections open at once from one address; more are closed on connect; 0 = no cap",
    )
    max_instance_bytes: int = Field(
        default=2 * 1024**3, ge=1024,
        description="largest data set a C-STORE may carry; larger ones are answered 0xA700 (out of resources)",
    )
    quarantine_max_mb: int = Field(
        default=2048, ge=0,
        description="total size of quarantine/; the oldest rejected instances are removed to stay under it",
    )
    max_rejected_per_association: int = Field(
        default=20, ge=1, description="rejected instances kept from one association; the next aborts it"
    )
    tls_cert_file: Path | None = Field(
        default=None, description="PEM certificate of the node: the SCP listens with DICOM TLS when set (with the key)"
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file")
    tls_ca_file: Path | None = Field(
        default=None, description="CA bundle: callers must present a certificate it signed (mutual TLS) when set"
    )
    min_free_disk_mb: int = Field(
        default=1024,
        ge=0,
        description="below this free space in the storage dir, associations and C-STOREs are refused (out of resources)",
    )
    keep_unanalysed_objects: bool = Field(
        default=True,
        description="keep on disk the objects received but not analysed (SR, GSPS, SC, PDF, other modalities); "
        "false = record and acknowledge them only",
    )
    export_threads: int = Field(
        default=4, ge=1, le=64,
        description="threads of the node's export worker: summaries recorded and results delivered at once "
        "(a delivery waits on the destination's storage, not on this host's CPU)",
    )
    export_retry_seconds: float = Field(
        default=10.0, gt=0, description="first delay before a failed delivery is tried again (doubles each time)"
    )
    sc_heatmap: bool = Field(
        default=False, description="draw the classifier's Grad-CAM heat map into the secondary capture (SC)"
    )
    worker_queues: list[str] = Field(
        default_factory=lambda: ["radiograph"], description="queues a `pleura worker` consumes"
    )
    api_host: str = Field(default="127.0.0.1", description="address the worklist API and page listen on")
    api_port: int = Field(default=8080, ge=1, le=65535, description="port of the worklist API and page")
    api_users: list[ApiUser] = Field(
        default_factory=list, description="JSON list of {name, role, token | token_sha256}; none = no worklist"
    )
    worklist_refresh_seconds: float = Field(
        default=5.0, gt=0, le=300, description="how often the page checks for changes when the event stream is down"
    )
    worklist_aging_minutes: float = Field(
        default=0.0, ge=0, description="a study without a verdict this long after it arrived rises to the top (0: off)"
    )
    site_time_zone: str = Field(default="UTC", description="IANA time zone the page shows times in (Europe/Berlin)")
    pacs_viewer_url: str | None = Field(
        default=None,
        description="the site's viewer for a study: a URL with {study_uid} and/or {accession_number} in it",
    )
    api_max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, description="largest request body the worklist API reads (413 beyond it)"
    )
    api_max_upload_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="largest corrected-outline upload (base64 PNG in JSON)"
    )
    api_login_max_failures: int = Field(
        default=10, ge=1, description="wrong tokens from one address within api_login_window_seconds before 429"
    )
    api_login_window_seconds: float = Field(
        default=300.0, gt=0, description="the window in which wrong tokens from one address are counted"
    )
    api_session_hours: float = Field(
        default=12.0, gt=0, description="how long a worklist log-in lasts (sessions are kept in the ledger)"
    )
    feedback_masks_per_study: int = Field(
        default=20, ge=1, description="corrected outlines stored for one study; more are refused (409)"
    )
    feedback_masks_per_user: int = Field(
        default=2000, ge=1, description="corrected outlines stored from one user; more are refused (429)"
    )
    stow_max_request_bytes: int = Field(
        default=4 * 1024**3, ge=1024,
        description="largest STOW-RS request (POST /dicomweb/studies) the API reads; 413 beyond it",
    )
    stow_max_part_bytes: int = Field(
        default=2 * 1024**3, ge=1024,
        description="largest instance in a STOW-RS request; a larger part is refused (0xA700) and not kept",
    )
    fhir: FhirEndpoint | None = Field(
        default=None,
        description='JSON {"url", auth…}: a FHIR R4 server that receives each analysis as a DiagnosticReport; unset = none',
    )
    hl7_destinations: list[Hl7Destination] = Field(
        default_factory=list, description="JSON list of RIS/worklist MLLP endpoints that receive ORU^R01"
    )
    hl7_sending_application: str = Field(default="PLEURA", max_length=180, description="MSH-3 of the messages")
    hl7_sending_facility: str = Field(default="", max_length=180, description="MSH-4 of the messages")
    webhooks: list[Webhook] = Field(default_factory=list, description="JSON list of webhook endpoints")
    notify_retry_seconds: float = Field(
        default=10.0, gt=0, description="first delay before a failed notification is tried again (doubles)"
    )
    shared_storage_url: str | None = Field(
        default=None,
        description="storage shared by hosts (s3://bucket/prefix?endpoint_url=..., file:///mnt/pleura); unset = one host",
    )
    metrics_host: str = Field(default="127.0.0.1", description="address of /healthz, /readyz and /metrics")
    metrics_port: int = Field(default=9464, ge=1, le=65535, description="port of /healthz, /readyz and /metrics")
    worker_metrics_port: int = Field(
        default=0, ge=0, le=65535, description="port of a `pleura worker`'s own /healthz, /readyz, /metrics; 0 = none"
    )
    log_format: Literal["text", "json"] = Field(default="text", description="text, or json (one object per line)")
    ct_model_dir: Path | None = Field(
        default=None, description="a fixed CT model bundle directory; unset = the registry's active CT model (the CT demo bundle until one is promoted)"
    )
    lung_segmenter_weights: Path | None = Field(
        default=None,
        description="weights of torchxrayvision's ChestX-Det lung segmenter (PSPNet); set: the share of the "
        "hemithorax is measured on its lung masks; unset = the threshold estimate of the lung fields",
    )
    torch_threads: int = Field(
        default=0, ge=0, le=1024, description="torch CPU threads per worker process; 0 = the CPU count / processes"
    )
    worker_threads: int = Field(
        default=1, ge=1, le=64,
        description="studies a `pleura worker` process analyses at once (threads pool); their images share forward passes",
    )
    analysis_processes: int = Field(
        default=0, ge=0, le=256,
        description="processes of a `pleura worker` process's pool that decode images and write results beside "
        "the forward pass; 0 = all in the worker process",
    )
    inference_batch_size: int = Field(default=8, ge=1, le=256, description="most images in one forward pass")
    batch_wait_ms: float = Field(
        default=5.0, ge=0, le=10000, description="how long a forward pass waits for other studies' images"
    )
    inference_precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        default="auto", description="autocast precision on CUDA (auto = fp16); the CPU always runs fp32"
    )
    torch_compile: bool = Field(default=False, description="torch.compile the networks on CUDA")
    inference_backend: Literal["auto", "torch", "onnxruntime"] = Field(
        default="auto",
        description="what runs the networks on the CPU: auto (whichever of torch and ONNX Runtime is faster "
        "for each network on this host, measured once), torch, or onnxruntime",
    )
    model_poll_seconds: float = Field(
        default=5.0, ge=0, le=3600,
        description="how often a `pleura worker` looks for a promoted model between tasks, to warm it before "
        "a study needs it; 0 = only when a task starts",
    )
    onnx_cache_dir: Path | None = Field(
        default=None,
        description="where the networks' ONNX exports and backend measurements are kept; "
        "unset = <storage_dir>/onnx-cache",
    )
    chest_body_parts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CHEST_BODY_PARTS),
        description="words that name the chest in Body Part Examined or a study/series description/protocol",
    )
    non_chest_terms: list[str] = Field(
        default_factory=lambda: list(DEFAULT_NON_CHEST_TERMS),
        description="words that make a body part or description something other than a chest film",
    )
    frontal_view_terms: list[str] = Field(
        default_factory=lambda: list(DEFAULT_FRONTAL_VIEW_TERMS),
        description="words that name a frontal view in View Position, a view code's meaning or a description",
    )
    lateral_view_terms: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LATERAL_VIEW_TERMS),
        description="words that name a lateral view in View Position, a view code's meaning or a description",
    )

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: check_ae_title(v)))

    @field_validator("site_time_zone")
    @classmethod
    def _known_time_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. Europe/Berlin, America/New_York, UTC)") from None
        return value

    @field_validator("pacs_viewer_url")
    @classmethod
    def _viewer_template(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        fields = set(re.findall(r"{([^{}]*)}", value))
        if not fields or not fields <= {"study_uid", "accession_number"} or not value.startswith(("http://", "https://")):
            raise ValueError(
                "must be an http(s) URL naming {study_uid} and/or {accession_number}, "
                "e.g. https://pacs.example.org/viewer?StudyInstanceUIDs={study_uid}"
            )
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, value: str | None) -> str | None:
        if value is not None and value.strip() == "":
            return None
        if value is not None and "://" not in value:
            raise ValueError("must be a URL such as redis://localhost:6379/0 (or unset for the embedded broker)")
        return value

    @field_validator("shared_storage_url")
    @classmethod
    def _check_shared_storage(cls, value: str | None) -> str | None:
        if value is not None and value.strip() == "":
            return None
        if value is not None and "://" not in value:
            raise ValueError("must be a URL such as s3://bucket/prefix or file:///mnt/pleura (or unset for one host)")
        return value

    @model_validator(mode="after")
    def _tls_files(self) -> "Settings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file (PLEURA_TLS_CERT_FILE, PLEURA_TLS_KEY_FILE) go together")
        for name in ("tls_cert_file", "tls_key_file", "tls_ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).expanduser().is_file():
                raise ValueError(f"{name} (PLEURA_{name.upper()}): {path} is not a file")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @model_validator(mode="after")
    def _deprecated_names(self) -> "Settings":
        if self.model_dir is not None:
            _warn_deprecated_model_dir(newer=self.model_registry_dir is not None or self.model_bundle_dir is not None)
        return self

    @model_validator(mode="after")
    def _absolute_paths(self) -> "Settings":
        self.storage_dir = self.storage_dir.expanduser().resolve()
        for name in ("model_registry_dir", "model_bundle_dir", "model_dir"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).expanduser().resolve())
        if self.ct_model_dir is not None:
            self.ct_model_dir = self.ct_model_dir.expanduser().resolve()
        if self.onnx_cache_dir is not None:
            self.onnx_cache_dir = self.onnx_cache_dir.expanduser().resolve()
        if self.lung_segmenter_weights is not None:
            self.lung_segmenter_weights = self.lung_segmenter_weights.expanduser().resolve()
        return self

    # Derived locations. They are properties, not settings, so there is one source of truth.
    @property
    def ledger_url(self) -> str:
        return self.database_url or f"sqlite:///{self.storage_dir / 'ledger.sqlite'}"

    @property
    def onnx_cache(self) -> Path:
        return self.onnx_cache_dir or self.storage_dir / "onnx-cache"

    @property
    def embedded_broker_file(self) -> Path:
        """The SQLite file of the embedded broker (used when broker_url is unset)."""
        return self.storage_dir / "broker.sqlite"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.embedded_broker_file}"

    @property
    def result_objects(self) -> list[str]:
        """The result objects the workers write: every kind some destination receives (the SR
        always, it is the record of the analysis), or all of them when there is no destination."""
        if not self.destinations:
            return list(RESULT_OBJECTS)
        wanted = {"SR"} | {kind for destination in self.destinations for kind in destination.objects}
        return [kind for kind in RESULT_OBJECTS if kind in wanted]

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file.get() or os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)


def _origin(name: str, config_file: str | None) -> str:
    """Where setting ``name``'s value came from, as an operator would look for it."""
    env = ENV_PREFIX + name.upper()
    if env not in os.environ and name in toml_keys(config_file):
        return f"TOML file {config_file}, key {name}"
    return f"env {env}"


def _describe(error: dict[str, Any], config_file: str | None) -> str:
    loc = [str(part) for part in error["loc"]]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not loc:  # a rule across settings (the TLS pair): its message names them and their variables
        return message
    where = ".".join(loc)
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" (got {mask_text(repr(value))})"
    return f"setting '{where}' ({_origin(loc[0], config_file)}): {message}{shown}; see docs/configuration.md"


_PARSE_ERROR = re.compile(r'error parsing value for field "(?P<name>\w+)" from source "(?P<source>\w+)"')


def _parse_error(exc: Exception, config_file: str | None) -> str | None:
    """pydantic-settings' 'error parsing value for field...' as a line that names the variable."""
    match = _PARSE_ERROR.search(str(exc))
    if not match:
        return None
    name = match["name"]
    cause = exc.__cause__ or exc.__context__
    detail = f" ({cause})" if cause else ""
    return (f"setting '{name}' ({_origin(name, config_file)}): not valid JSON{detail}; give a JSON value, "
            f"e.g. {ENV_PREFIX}{name.upper()}='[{{\"ae_title\": \"PACS\", \"host\": \"pacs\", \"port\": 104}}]' "
            "(see docs/configuration.md)")


OTHER_VARIABLES = frozenset({CONFIG_FILE_ENV})
"""``PLEURA_*`` variables that are no setting but are known (the TOML file's name)."""


def unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """One line per ``PLEURA_*`` variable that names no setting, with the closest known one: a
    typo such as ``PLEURA_PORTT`` would otherwise be ignored without a word."""
    import difflib

    environ = dict(os.environ if environ is None else environ)
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | OTHER_VARIABLES
    lines = []
    for variable in sorted(v for v in environ if v.startswith(ENV_PREFIX) and v not in known):
        close = difflib.get_close_matches(variable, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see docs/configuration.md for the settings"
        lines.append(f"unknown variable {variable} is ignored: {hint}")
    return lines


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings, or raise :class:`SettingsError` naming each wrong setting.

    `config_file` (else ``PLEURA_CONFIG``) names the TOML file; environment variables override it.
    """
    if config_file is not None:
        if not Path(config_file).is_file():
            raise SettingsError(f"config file {config_file} does not exist (from --config or {CONFIG_FILE_ENV})")
    elif os.environ.get(CONFIG_FILE_ENV) and not Path(os.environ[CONFIG_FILE_ENV]).is_file():
        raise SettingsError(f"config file {os.environ[CONFIG_FILE_ENV]} named by {CONFIG_FILE_ENV} does not exist")
    token = _config_file.set(str(config_file) if config_file is not None else None)
    source_file = str(config_file) if config_file is not None else os.environ.get(CONFIG_FILE_ENV)
    for line in unknown_variables():
        logging.getLogger("pleura.config").warning(line)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [_describe(err, source_file) for err in exc.errors()]
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    except Exception as exc:  # TOML syntax errors, JSON in env vars that does not parse
        raise SettingsError(f"invalid configuration: {_parse_error(exc, source_file) or mask_text(str(exc))}") from None
    finally:
        _config_file.reset(token)


def toml_keys(config_file: Path | str | None) -> dict[str, Any]:
    """The keys and values of the TOML settings file; empty without one."""
    import tomllib

    if not config_file or not Path(config_file).is_file():
        return {}
    with open(config_file, "rb") as handle:
        return tomllib.load(handle)
