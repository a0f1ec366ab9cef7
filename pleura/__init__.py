"""Pleura: a DICOM node that flags suspected pneumothorax on chest radiographs."""

__version__ = "0.1.0"
