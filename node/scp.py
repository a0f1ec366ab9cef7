"""The DICOM SCP: C-ECHO and C-STORE of every Storage SOP class a PACS may push.

The C-STORE handler is small on purpose: pynetdicom receives the data set to a temporary file in
chunks (so memory stays flat whatever the instance size); the handler hands that file to the node's
one receive path (``node/receive.py``, shared with STOW-RS), which reads the few UIDs it needs
(no large value read, no pixel decoding), moves the file durably into storage, records the instance
in the ledger and only then answers success. An instance larger than
``max_instance_bytes`` is answered "Out of Resources"; one whose elements declare more bytes than
arrived is refused. What cannot be accepted is kept in quarantine with the reason, and the sender gets
a failure status from PS3.4 Annex B; a storage or ledger error answers "Out of Resources", so the
sender keeps the instance and tries again.

Only radiographs (CR, DX) and CT images are analysed. A PACS pushes whole studies, though, with
reports, presentation states and other modalities' images in them, and refusing one object makes
many senders give up the whole study (Orthanc answers HTTP 500, storescu stops at the first
refusal). So every other public Storage SOP class is accepted, acknowledged and recorded as skipped
with the reason, kept on disk or discarded (setting ``keep_unanalysed_objects``), and never
analysed; it never re-opens an analysed study. Pleura's own results coming back (a PACS routing the
study back) are acknowledged and neither kept nor recorded again.

A Segmentation (SEG) is not analysed: it is a radiologist's outline sent back to Pleura, stored
like an instance and recorded as labels for the images it references (:mod:`node.seg_labels`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import cast
from weakref import WeakKeyDictionary

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from config.settings import Settings
from node.admission import Admission, NodeAE
from node.audit import AuditTrail
from node.connections import Limits, Refused
from node.ledger import Ledger
from node.listening import listen_error
from node.receive import CANNOT_UNDERSTAND, SUCCESS, Arrival, Receiver
from node.seg_labels import SEG_TRANSFER_SYNTAXES, SEGMENTATION_SOP_CLASS
from node.storage import InstanceStore
from node.tls import server_context

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,  # 1.2.840.10008.1.2.4.57
    JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70
    JPEGLSLossless,  # 1.2.840.10008.1.2.4.80
    JPEGLSNearLossless,  # 1.2.840.10008.1.2.4.81
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,  # 1.2.840.10008.1.2.4.201
    HTJ2KLosslessRPCL,  # 1.2.840.10008.1.2.4.202
    HTJ2K,  # 1.2.840.10008.1.2.4.203
    RLELossless,
)
"""Accepted for every Storage SOP class but Segmentation: the ones the worker decodes (pydicom with
the pylibjpeg plugins: libjpeg for JPEG and JPEG-LS, openjpeg for JPEG 2000 and HTJ2K, rle)."""


_ERROR_COMMENT_LENGTH = 64  # Error Comment is LO


PRIORITY_HIGH = 0x0001
"""The C-STORE request's Priority (0000,0700) HIGH (PS3.7 9.1.1.1): the study is urgent."""


def _status(code: int, comment: str | None = None) -> Dataset:
    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:_ERROR_COMMENT_LENGTH]
    return status


def build_ae(settings: Settings, admission: Admission | None = None, on_refused: Refused | None = None) -> NodeAE:
    """The node's application entity with the contexts it accepts as an SCP and its admission
    rules (calling-AE allowlist, association limits, free-space guard, timeouts and deadlines);
    `on_refused` hears of each connection refused or dropped."""
    ae = NodeAE(settings.ae_title, admission or Admission(settings), Limits.from_settings(settings), on_refused)
    ae.require_called_aet = True
    ae.maximum_pdu_size = settings.max_pdu
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        sop_class = str(context.abstract_syntax)
        syntaxes = SEG_TRANSFER_SYNTAXES if sop_class == SEGMENTATION_SOP_CLASS else TRANSFER_SYNTAXES
        ae.add_supported_context(sop_class, list(syntaxes))
    return ae


class StorageSCP:
    """C-ECHO and C-STORE SCP that stores durably and records in the ledger."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        store: InstanceStore,
        admission: Admission | None = None,
        on_released: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        # Told when an association that stored instances was released normally (the settle loop
        # wakes: their study may be due after the grace).
        self.on_released = on_released
        # The ledger's id of each association that stored something (node/ledger Association).
        self._association_ids: WeakKeyDictionary[Association, str] = WeakKeyDictionary()
        self.ledger = ledger
        self.store = store
        self.admission = admission or Admission(settings)
        self.audit = AuditTrail(settings.storage_dir)
        self.receiver = Receiver(settings, ledger, store, self.admission, self.audit)
        self.ae = build_ae(settings, self.admission, self._audit_connection)
        self._server: ThreadedAssociationServer | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen on settings.host:settings.port in background threads."""
        if self._server is not None:
            return
        # C-STOREs are received to a temporary file in chunks, never held in memory (pynetdicom's
        # documented switch; it is process-wide, and pynetdicom's other handlers read such files too).
        _config.STORE_RECV_CHUNKED_DATASET = True
        try:
            self._server = self.ae.start_server(
                (self.settings.host, self.settings.port),
                block=False,
                ssl_context=server_context(self.settings),
                evt_handlers=[
                    (evt.EVT_C_STORE, self.handle_store),
                    (evt.EVT_C_ECHO, self.handle_echo),
                    (evt.EVT_ESTABLISHED, self._audit_association),
                    (evt.EVT_REJECTED, self._audit_association),
                    (evt.EVT_RELEASED, self._association_ended),
                    (evt.EVT_ABORTED, self._association_ended),
                    (evt.EVT_CONN_CLOSE, self._association_ended),
                ],
            )
        except OSError as exc:
            raise listen_error(
                "the DICOM service", self.settings.host, self.settings.port, "PLEURA_PORT (PLEURA_HOST)", exc
            ) from exc
        log.info(
            "DICOM SCP %s listening on %s:%d%s",
            self.settings.ae_title,
            self.settings.host,
            self.settings.port,
            " (DICOM TLS)" if self.settings.tls else "",
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
            log.info("DICOM SCP stopped")

    def _audit_connection(self, what: str, address: str, reason: str) -> None:
        self.audit.record(what, address=address, reason=reason, tls=self.settings.tls)

    def _audit_association(self, event: Event) -> None:
        requestor = event.assoc.requestor
        self.audit.record(
            "association-accepted" if event.event is evt.EVT_ESTABLISHED else "association-rejected",
            calling_ae=requestor.ae_title.strip(),
            address=requestor.address,
            tls=self.settings.tls,
        )

    def _association_id(self, event: Event) -> str:
        """The ledger's id of the event's association, recorded at its first stored instance."""
        association_id = self._association_ids.get(event.assoc)
        if association_id is None:
            association_id = str(uuid.uuid4())
            self.ledger.open_association(association_id, event.assoc.requestor.ae_title)
            self._association_ids[event.assoc] = association_id
        return association_id

    def _association_ended(self, event: Event) -> None:
        """Record how an association that stored instances ended: released normally (A-RELEASE),
        or aborted or dropped, which makes no study due early."""
        association_id = self._association_ids.get(event.assoc)
        if association_id is None:
            return
        released = event.event is evt.EVT_RELEASED or (
            event.event is evt.EVT_CONN_CLOSE and bool(event.assoc.is_released)
        )
        try:
            now_released = self.ledger.end_association(association_id, released=released)
        except Exception as exc:  # the study then settles on the quiet time
            log.warning("cannot record the end of an association from %s: %s", event.assoc.requestor.ae_title, exc)
            return
        if now_released and self.on_released is not None:
            self.on_released()

    def _urgent(self, event: Event) -> bool:
        """Whether the sender marked this instance urgent: Priority HIGH, or a STAT calling AE."""
        priority = getattr(cast(C_STORE, event.request), "Priority", None)
        calling_ae = event.assoc.requestor.ae_title.strip()
        return priority == PRIORITY_HIGH or calling_ae in self.settings.stat_calling_aes

    def handle_echo(self, event: Event) -> int:
        log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
        return SUCCESS

    def handle_store(self, event: Event) -> Dataset:
        """Answer a C-STORE: the received file goes through the node's one receive path
        (:class:`~node.receive.Receiver`), which says the status."""
        calling_ae = event.assoc.requestor.ae_title
        try:
            # Received to disk in chunks (STORE_RECV_CHUNKED_DATASET): the file meta pynetdicom
            # wrote from the command set and context, then the data set's bytes as they arrived.
            data = event.dataset_path
        except AttributeError:
            data = None
        if data is None or not Path(data).is_file():  # the request carried no dataset at all
            log.warning("C-STORE from %s without a usable dataset", calling_ae)
            return _status(CANNOT_UNDERSTAND, "no data set in the C-STORE request")
        assoc = event.assoc
        answer = self.receiver.receive(
            Arrival(
                data=Path(data),
                calling_ae=calling_ae,
                address=assoc.requestor.address,
                sop_class_uid=str(event.context.abstract_syntax),
                transfer_syntax_uid=str(event.context.transfer_syntax),
                affected_sop_instance_uid=str(cast(C_STORE, event.request).AffectedSOPInstanceUID or ""),
                batch=assoc,
                abort=assoc.abort,
                association_id=lambda: self._association_id(event),
                urgent=self._urgent(event),
            )
        )
        return _status(answer.status, answer.comment)
