"""What the routers are given: the ledger, the settings and the preview renderer, from app.state."""

from __future__ import annotations

from fastapi import Request

from config.settings import Settings
from node.api.context import StudyContext
from node.api.previews import PreviewRenderer
from node.ledger import Ledger


def get_ledger(request: Request) -> Ledger:
    return request.app.state.ledger


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_previews(request: Request) -> PreviewRenderer:
    return request.app.state.previews


def get_context(request: Request) -> StudyContext:
    return request.app.state.context
