"""The worklist API (FastAPI): studies sorted by urgency, one study with its images and PNG
previews, radiologists' feedback and its export, the notifications sent; plus the web page
(``node/web/static``). :func:`node.api.app.create_app` builds it; :class:`node.api.server.WorklistServer`
serves it (uvicorn) inside ``pleura node`` or ``pleura worklist``."""
