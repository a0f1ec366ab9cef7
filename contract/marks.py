"""What marks a DICOM object as Pleura's own result: its Manufacturer and the Series Number of
each result kind.

Below both the worker, whose writers set them (:mod:`worker.writers.common`), and the node, which
recognises one of its own results that a PACS sends back (:mod:`node.receive`,
:mod:`node.seg_labels`) without importing the worker or loading a model.
"""

from __future__ import annotations

MANUFACTURER = "Pleura"
"""Manufacturer (0008,0070) of every object Pleura writes."""

SERIES_NUMBERS = {"SEG": 9901, "SR": 9902, "SC": 9903, "GSPS": 9904}
"""Series Number of each kind of result, so they sort the same way in every study."""
