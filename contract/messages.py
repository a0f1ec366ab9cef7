"""The messages between the node and the workers, as versioned pydantic models.

Two messages cross the broker: the analysis task carries the study UID, an :class:`InstanceRef` per
instance and the :class:`AnalysisOptions`; the worker answers with an :class:`AnalysisSummary`. On the wire
(Celery, JSON) each is its :meth:`~Message.to_message` form; the receiving side reads it back with
:meth:`~Message.from_message`, which raises :class:`MessageError` naming the first bad field.

Names. The code uses one name per thing: ``study_uid``, ``series_instance_uid``,
``sop_instance_uid``, ``storage_key``, ``analysis_status``, ``analysis_reason``, ``gap_mm``. A few
wire keys keep the names version 1 sent (``key`` for a storage key, ``status`` and ``reason`` for
an image's analysis status and reason), so nodes and workers of either version understand each
other; reading accepts both names, and an older worker's ``series_uid`` too.

A message without ``version`` is version 1.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar, Literal, Self

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from config.errors import PleuraError

MESSAGE_VERSION = 1
"""The version of the messages this code writes."""

ImageStatus = Literal["analysed", "not_analysed", "failed"]
ResultKind = Literal["SEG", "SR", "GSPS", "SC"]
RESULT_KINDS: tuple[str, ...] = ("SEG", "SR", "GSPS", "SC")


class MessageError(PleuraError, ValueError):
    """A message that does not validate; the text names the field."""


def _wire_name(name: str, wire: str) -> dict[str, Any]:
    """A field called `name` in the code and `wire` on the wire; either is read."""
    return {"validation_alias": AliasChoices(name, wire), "serialization_alias": wire}


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _error_text(name: str, error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    loc = tuple(first["loc"])
    if first["type"] == "missing":
        where = f"'{_field_path(loc[:-1])}'" if loc[:-1] else f"the {name}"
        return f"{name}: {where} has no '{loc[-1]}'"
    if first["type"] in ("model_type", "model_attributes_type", "dict_type"):
        where = _field_path(loc) or f"the {name}"
        return f"{name}: {where} must be an object, got {type(first['input']).__name__}"
    if first["type"] == "literal_error":
        expected = first.get("ctx", {}).get("expected", "")
        return f"{name}: {_field_path(loc)} {first['input']!r} is not one of {expected}"
    return f"{name}: {_field_path(loc)} {first['input']!r}: {first['msg']}"


class Message(BaseModel):
    """What every message shares: its version, unknown keys ignored (a newer sender's)."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)

    message_name: ClassVar[str] = "message"

    @classmethod
    def from_message(cls, data: Any) -> Self:
        """The message read from its wire form (a dict), or :class:`MessageError` naming the field."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise MessageError(f"{cls.message_name}: the {cls.message_name} must be an object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise MessageError(_error_text(cls.message_name, exc)) from None

    def to_message(self) -> dict[str, Any]:
        """The wire form: JSON types only, the wire names."""
        return self.model_dump(mode="json", by_alias=True)


class InstanceRef(Message):
    """One instance an analysis task names: where the worker reads it, and what routes it (the
    series and SOP class send CT series to their own queue; an older node's message has neither)."""

    message_name: ClassVar[str] = "instance reference"

    sop_instance_uid: str
    storage_key: str = Field(**_wire_name("storage_key", "key"))
    series_instance_uid: str | None = None
    sop_class_uid: str | None = None

    def to_message(self) -> dict[str, Any]:
        # Without the routing fields an older node's message did not have.
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ReportRef(Message):
    """The report a re-analysis supersedes: where the worker reads it, and the model that made it
    (a report of the same model version supersedes nothing new)."""

    message_name: ClassVar[str] = "superseded report"

    sop_instance_uid: str
    storage_key: str
    sop_class_uid: str | None = None
    study_uid: str | None = None
    model_name: str | None = None
    model_version: str | None = None


class AnalysisOptions(Message):
    """What an analysis task asks of the worker beside its instances: built by the node
    (:func:`node.dispatch.analysis_options`), read back by the worker.

    Version 1 wrote the options without a ``version`` key, and so does this code while it writes
    version 1: the wire form is that of every node and worker so far. A field not set is left out.
    """

    message_name: ClassVar[str] = "analysis options"

    version: int = MESSAGE_VERSION
    objects: list[ResultKind] | None = None
    """The result objects to write (the SR always); unset (an older node): all of them."""
    sc_heatmap: bool = False
    """Whether the secondary capture carries the Grad-CAM heat map."""
    heartbeat_seconds: float | None = None
    """How often a running analysis tells the node it is alive; unset: never."""
    supersedes: ReportRef | None = None
    """A re-analysis: the study's earlier report."""
    not_analysed_reason: str | None = None
    """A study whose analysis killed its worker twice: report its images as not analysed, for this
    reason, without running the networks."""

    def to_message(self) -> dict[str, Any]:
        exclude = {"version"} if self.version == 1 else set()
        return self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=exclude)


class ReportedModel(Message):
    """The model that analysed, as the results name it."""

    name: str
    version: str
    synthetic_demo: bool = False


class ImageEntry(Message):
    """One image of an analysis: its status and reason, and the finding when it was analysed."""

    sop_instance_uid: str
    analysis_status: ImageStatus = Field("not_analysed", **_wire_name("analysis_status", "status"))
    analysis_reason: str | None = Field(None, **_wire_name("analysis_reason", "reason"))
    probability: float | None = None
    flagged: bool | None = None
    area_px: int | None = None
    area_cm2: float | None = None
    side: str | None = None
    gap_mm: float | None = None
    """The largest pleural gap (mm); the worklist and the notifications call it ``largest_gap_mm``."""
    hemithorax_fraction: float | None = None


class ResultEntry(Message):
    """One result object the worker wrote to the shared storage."""

    kind: ResultKind
    storage_key: str = Field(**_wire_name("storage_key", "key"))
    sop_instance_uid: str
    sop_class_uid: str
    source_sop_instance_uid: str | None = None


class AnalysisSummary(Message):
    """A worker's answer for one analysis task (a radiograph study, or one CT series of it)."""

    message_name: ClassVar[str] = "analysis summary"

    study_uid: str
    version: int = MESSAGE_VERSION
    model: ReportedModel
    images: list[ImageEntry]
    results: list[ResultEntry]
    flagged: bool = False
    analysed_at: datetime | None = None
    # A CT series: which one, and the volume findings.
    series_instance_uid: str | None = Field(None, validation_alias=AliasChoices("series_instance_uid", "series_uid"))
    volume_ml: float | None = None
    side: str | None = None
    hemithorax_fraction: float | None = None


def analysed_now() -> datetime:
    """The time an analysis summary is stamped with (the worker's clock, UTC)."""
    return datetime.now(timezone.utc)


def storage_keys(items: list[dict[str, Any]]) -> list[str]:
    """The storage keys that instance references or result entries in their wire form name,
    under either name (``storage_key``, or ``key`` as version 1 wrote it)."""
    return [str(item["storage_key"] if "storage_key" in item else item["key"]) for item in items]
