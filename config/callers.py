"""Who may call Pleura: the modalities and PACS allowed to send (by AE title and address) and the
users of the worklist API; and the rule every DICOM AE title in the settings follows."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash


def check_ae_title(value: str) -> str:
    """A DICOM AE title, stripped: 1 to 16 printable characters, no backslash (a caller's, a
    destination's, the node's own)."""
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("must be 1 to 16 printable characters, no backslash")
    return value.strip()


class AllowedCaller(BaseModel):
    """A modality or PACS allowed to send to Pleura: its AE title and, optionally, the addresses it
    must call from."""

    ae_title: str
    hosts: list[str] = Field(default_factory=list, description="IP addresses it may call from; empty = any")

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: check_ae_title(v)))


MIN_TOKEN_CHARS = 22
"""The shortest API token: 128 bits as URL-safe base64 (``pleura api-token`` makes 256). A hashed
token cannot be measured, so the API refuses any presented token shorter than this: a
``token_sha256`` of ``password`` lets nobody in."""


class ApiUser(BaseModel):
    """Someone (a person or a system) allowed to use the worklist API and page."""

    name: str = Field(min_length=1, max_length=64, description="shown with the feedback this user gives")
    role: Literal["read", "feedback", "sender"] = Field(
        default="read",
        description="read: see the worklist; feedback: also confirm, reject, mark known; sender: only send "
        "instances by STOW-RS (POST /dicomweb/studies), see nothing",
    )
    token: str | None = Field(
        default=None, min_length=MIN_TOKEN_CHARS, description="the secret the user logs in with (`pleura api-token` makes one)"
    )
    token_sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$", description="the SHA-256 (hex) of the token, instead of the token"
    )

    @model_validator(mode="after")
    def _one_secret(self) -> "ApiUser":
        if (self.token is None) == (self.token_sha256 is None):
            raise ValueError(f"API user {self.name!r} needs exactly one of token or token_sha256")
        return self
