"""Where Pleura sends what it makes: the destinations of its result objects (a DICOM node by C-STORE,
a DICOMweb archive by STOW-RS), the FHIR server of its reports, the HL7 listeners and webhooks of its
notifications, and the HTTP authentication they share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Discriminator, Field, Tag, field_validator, model_validator

from config.callers import check_ae_title
from config.secrets import mask_text

ResultObject = Literal["SR", "SEG", "GSPS", "SC"]
RESULT_OBJECTS: tuple[str, ...] = ("SR", "SEG", "GSPS", "SC")
"""The result objects Pleura writes: the report, the segmentation, the presentation state with the
outline, and the secondary capture image with outline and banner."""


class ReceivesResults(BaseModel):
    """What every kind of destination shares: the result objects it receives."""

    objects: list[ResultObject] = Field(
        default_factory=lambda: list(RESULT_OBJECTS),
        min_length=1,
        description="the result objects this destination receives: any of SR, SEG, GSPS, SC",
    )

    @field_validator("objects")
    @classmethod
    def _unique_objects(cls, value: list[str]) -> list[str]:
        return [kind for kind in RESULT_OBJECTS if kind in value]


class Destination(ReceivesResults):
    """A DICOM node (usually the PACS) that receives Pleura's results by C-STORE."""

    kind: Literal["dimse"] = Field(default="dimse", description="dimse (C-STORE, the default) or dicomweb (STOW-RS)")
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = Field(
        default=None, description="AE title Pleura calls itself on this association; default: PLEURA_AE_TITLE"
    )
    max_attempts: int = Field(default=10, ge=1, description="delivery attempts before a result is marked failed")
    tls: bool = Field(default=False, description="DICOM TLS to this destination")
    tls_ca_file: Path | None = Field(
        default=None, description="CA bundle that signs the destination's certificate; unset = the system's"
    )

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: check_ae_title(v)))

    @property
    def label(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class HttpAuth(BaseModel):
    """How Pleura authenticates to an HTTP service (a DICOMweb destination, a FHIR server) and
    checks its certificate."""

    url: str = Field(pattern=r"^https?://", description="the service's base URL")
    auth: Literal["none", "basic", "bearer", "oauth2"] = Field(
        default="none", description="none, basic (username, password), bearer (token) or oauth2 (client credentials)"
    )
    username: str | None = Field(default=None, description="basic: the user name")
    password: str | None = Field(default=None, description="basic: the password")
    token: str | None = Field(default=None, description="bearer: the token sent as Authorization: Bearer")
    token_url: str | None = Field(
        default=None, pattern=r"^https://", description="oauth2: the token endpoint (https: the client secret goes there)"
    )
    client_id: str | None = Field(default=None, description="oauth2: the client's id")
    client_secret: str | None = Field(default=None, description="oauth2: the client's secret")
    scope: str | None = Field(default=None, description="oauth2: the scopes asked for, space-separated")
    ca_file: Path | None = Field(
        default=None, description="CA bundle that signs the server's certificate (https); unset = the system's"
    )
    timeout_seconds: float = Field(default=30.0, gt=0, description="seconds to connect, and to wait for each answer")
    max_attempts: int = Field(default=10, ge=1, description="attempts before a delivery is marked failed")

    @model_validator(mode="after")
    def _auth_fields(self) -> "HttpAuth":
        needed = {"basic": ("username", "password"), "bearer": ("token",),
                  "oauth2": ("token_url", "client_id", "client_secret")}.get(self.auth, ())
        missing = [name for name in needed if not getattr(self, name)]
        if missing:
            raise ValueError(f"auth {self.auth} of {self.label} needs {', '.join(missing)}")
        if self.ca_file is not None and not Path(self.ca_file).expanduser().is_file():
            raise ValueError(f"ca_file of {self.label}: {self.ca_file} is not a file")
        return self

    @property
    def label(self) -> str:
        """The service's name in the outbox and the logs: its URL, without any password in it."""
        return mask_text(self.url.rstrip("/"))


class DicomwebDestination(HttpAuth, ReceivesResults):
    """A DICOMweb archive (a cloud DICOM store, a VNA, Orthanc's plugin) that receives Pleura's
    results by STOW-RS."""

    kind: Literal["dicomweb"]
    url: str = Field(pattern=r"^https?://", description="the DICOMweb base URL (STOW-RS goes to <url>/studies)")


def _destination_kind(value: Any) -> str:
    kind = value.get("kind", "dimse") if isinstance(value, dict) else getattr(value, "kind", "dimse")
    return "dicomweb" if kind == "dicomweb" else "dimse"


AnyDestination = Annotated[
    Union[Annotated[Destination, Tag("dimse")], Annotated[DicomwebDestination, Tag("dicomweb")]],
    Discriminator(_destination_kind),
]
"""A C-STORE destination (no ``kind``, or ``"kind": "dimse"``) or a STOW-RS one (``"kind": "dicomweb"``)."""


class FhirEndpoint(HttpAuth):
    """A FHIR R4 server (an EHR's) that receives each analysis as a DiagnosticReport with its
    Observations and the model as a Device."""

    url: str = Field(pattern=r"^https?://", description="the FHIR base URL (the transaction Bundle is POSTed there)")
    identifier_system: str = Field(
        default="urn:pleura:analysis",
        description="the system of the resources' identifiers (make it the site's own URI: urn:oid:… or https://…)",
    )
    patient_identifier_system: str | None = Field(
        default=None, description="the system of the Patient ID, for the report's subject; unset = no subject"
    )


class Hl7Destination(BaseModel):
    """A RIS or worklist that receives HL7 v2 ORU^R01 messages over MLLP."""

    host: str
    port: int = Field(ge=1, le=65535)
    receiving_application: str = Field(default="RIS", max_length=180)
    receiving_facility: str = Field(default="", max_length=180)
    priority: str = Field(default="S", max_length=2, description="OBR-5 priority of a flagged study (S = stat)")
    abnormal_flag: str = Field(default="AA", max_length=5, description="OBX-8 of a suspected finding (AA = critical)")
    max_attempts: int = Field(default=10, ge=1)
    timeout_seconds: float = Field(default=10.0, gt=0)
    tls: bool = Field(default=False, description="MLLP over TLS to this listener (its certificate and host name checked)")
    tls_ca_file: Path | None = Field(
        default=None, description="CA bundle that signs the listener's certificate; unset = the system's"
    )

    @model_validator(mode="after")
    def _ca_file(self) -> "Hl7Destination":
        if self.tls_ca_file is not None and not Path(self.tls_ca_file).expanduser().is_file():
            raise ValueError(f"tls_ca_file of the HL7 destination {self.host}:{self.port}: {self.tls_ca_file} is not a file")
        return self

    @property
    def label(self) -> str:
        """The destination's name in the ledger's notifications (the same with or without TLS)."""
        return f"mllp://{self.host}:{self.port}"


class Webhook(BaseModel):
    """An HTTP(S) endpoint that receives a JSON body when a study is flagged or its flag withdrawn."""

    url: str = Field(pattern=r"^https?://", description="http:// or https:// URL")
    secret: str | None = Field(default=None, description="signs each body: X-Pleura-Signature: sha256=<HMAC>")
    max_attempts: int = Field(default=10, ge=1)
    timeout_seconds: float = Field(default=10.0, gt=0)
