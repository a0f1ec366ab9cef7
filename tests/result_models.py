"""The model identities the result-writer tests build objects with: a synthetic demo model, whose
objects must say so, and a clinical one, whose objects must not."""

from __future__ import annotations

from contract.bundle import DEMO_INTENDED_USE, ModelIdentity

DEMO_MODEL = ModelIdentity(
    name="pleura-demo",
    version="0.1.0-demo",
    manufacturer="Pleura",
    synthetic_demo=True,
    intended_use=DEMO_INTENDED_USE,
)
CLINICAL_MODEL = ModelIdentity(
    name="pleura-cxr",
    version="2.3.1",
    manufacturer="Pleura",
    synthetic_demo=False,
    intended_use="Triage of suspected pneumothorax on adult chest radiographs",
)
