"""Which queue analyses which instances of a settled study: CT series to the CT queue, one task
per series; everything else to the radiograph queue, one task for the study.

Decided from the ledger's SOP Class UID of each instance, so the node reads no file and imports no
worker code. A CT series is sent whole (all its slices that arrived before the study settled).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contract.messages import InstanceRef

CT_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage (the CT worker says why it is not analysed)
    }
)


@dataclass
class Routed:
    """A study's pending instances by destination: radiograph task instances and CT series."""

    radiograph: list[dict[str, str]] = field(default_factory=list)
    ct_series: dict[str, list[dict[str, str]]] = field(default_factory=dict)


def route_instances(instances: list[dict[str, str]]) -> Routed:
    """Split the instances (:class:`~contract.messages.InstanceRef` in their wire form); an
    instance without a SOP class (an older node's message) goes to the radiograph queue."""
    routed = Routed()
    for item in instances:
        instance = InstanceRef.from_message(item)
        if instance.sop_class_uid in CT_SOP_CLASSES:
            routed.ct_series.setdefault(instance.series_instance_uid or "", []).append(item)
        else:
            routed.radiograph.append(item)
    return routed
