"""Analyse one study: select eligible images, decode, infer in batches, write the result objects.

Per analysed image: a SEG when it is flagged (and the bundle has a U-Net), and the GSPS and SC when some destination receives
them; per analysis: one SR covering every image, analysed or not (with the reason), so a study is
never left without an answer.

The worker reads the images from shared storage by key and writes its results back there; it
never touches the node's ledger. What it returns (and sends to the node's export queue) is a
small JSON summary: :class:`contract.messages.AnalysisSummary` in its wire form.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from contract.bundle import Bundle, load_bundle
from contract.messages import (
    AnalysisOptions,
    AnalysisSummary,
    ImageEntry,
    InstanceRef,
    ReportRef,
    ReportedModel,
    ResultEntry,
    analysed_now,
)
from contract.networks import LoadedModels, load_models
from node.privacy import error_text, ref
from node.storage import InstanceStore
from worker.image_jobs import (
    DEFER_SIZE, CompactMask, decode_image, decode_job, store_result, write_image_results, write_job,
)
from worker.inference.batcher import ForwardBatcher
from worker.inference.heatmap import gradcam_heatmap
from worker.inference.onnx_backend import auto_networks, onnx_networks
from worker.inference.lungs import LungSegmenter, configured_lung_segmenter
from worker.inference.predict import network_outputs, predict_images
from worker.inference.result import ImageFinding
from worker.inference.runtime import accelerate
from worker.inference.select import Vocabulary, assess, frontal_check_reason
from worker.pool import AnalysisPool, SharedArray, analysis_pool
from worker.stage_times import StageTimes
from worker.writers.sr import AnalysedImage, SkippedImage, SupersededReport, build_sr

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger(__name__)


def failed_summary(study_uid: str, instances: list[dict[str, str]], reason: str) -> dict[str, Any]:
    """The summary (wire form) of an analysis that could not run at all, so the ledger shows why."""
    return AnalysisSummary(
        study_uid=study_uid,
        model=ReportedModel(name="unavailable", version="unavailable"),
        images=[
            ImageEntry(sop_instance_uid=item.sop_instance_uid, analysis_status="failed", analysis_reason=reason)
            for item in map(InstanceRef.from_message, instances)
        ],
        results=[],
        flagged=False,
        analysed_at=analysed_now(),
    ).to_message()


ALL_OBJECTS = ("SR", "SEG", "GSPS", "SC")
CRASHED_VARIANT = "not analysed: the analysis crashed"
"""The report written instead of an analysis that killed its worker: another report (UID) than
the one the models would write of the same images."""
__all__ = ["ALL_OBJECTS", "CRASHED_VARIANT", "StudyAnalyser", "failed_summary"]


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


class StudyAnalyser:
    """Holds the loaded models; analyses studies, one after another or several at once from
    threads (their images then share forward passes through :attr:`batcher`).

    ``backend`` (the CPU only): torch, onnxruntime, or auto, whichever of the two is faster for
    each network on this host (:func:`~worker.inference.onnx_backend.auto_networks`; the worker's
    default through ``inference_backend``).
    """

    def __init__(
        self, storage_dir: Path, bundle: Bundle, device: str = "auto", batch_size: int = 8, batch_wait_s: float = 0.0,
        precision: str = "auto", compile_networks: bool = False, backend: str = "torch", onnx_cache: Path | None = None,
        vocabulary: Vocabulary | None = None, lung_segmenter: LungSegmenter | None = None,
        pool: AnalysisPool | None = None,
    ) -> None:
        self.storage_dir = storage_dir
        # Decoding and result writing in these processes, beside the forward pass (worker/pool.py);
        # None: in this process. The pool is the worker process's, not the model's: it outlives reloads.
        self.pool = pool
        # Lung fields of the hemithorax share: the segmenter's masks, else the threshold estimate.
        self.lung_segmenter = lung_segmenter
        # The site's words for chest and for frontal and lateral views (eligibility).
        self.vocabulary = vocabulary or Vocabulary()
        self.store = InstanceStore(storage_dir)
        self.bundle = bundle
        # On CUDA: mixed precision, channels-last, optionally compiled; on the CPU as loaded.
        self.models: LoadedModels = accelerate(load_models(bundle, device), precision, compile_networks)
        self.batch_size = batch_size
        if backend not in ("auto", "torch", "onnxruntime"):
            raise ValueError(f"inference backend {backend!r}: use auto, torch or onnxruntime")
        # None: the torch networks of self.models; else (classifier, segmenter) callables, each the
        # torch network or its ONNX Runtime export. ONNX Runtime runs on the CPU only.
        self.networks = None
        self.backends = ("torch", "torch")
        if self.models.segmenter is None and backend != "torch":
            log.info("classifier-only bundle: inference backend torch (ONNX export covers classifier and U-Net)")
            backend = "torch"
        if self.models.device.type == "cpu" and backend != "torch":
            cache = onnx_cache or storage_dir / "onnx-cache"
            if backend == "onnxruntime":
                self.networks, self.backends = onnx_networks(bundle, cache), ("onnxruntime", "onnxruntime")
            else:
                networks, self.backends = auto_networks(self.models, bundle, cache)
                self.networks = None if self.backends == ("torch", "torch") else networks
        # Analyses running at once in this process (a threads pool) share forward passes; this
        # analyser's batcher never mixes in another model's images.
        self.batcher = ForwardBatcher(
            lambda images: network_outputs(self.models, images, self.networks), batch_size, batch_wait_s
        )

    def warm(self) -> None:
        """One forward pass of each network on a blank image, so the first study does not pay for
        the first call (allocations, kernels chosen, ONNX Runtime's session set-up), and start the
        analysis pool's processes. The export and the backend choice happen when the analyser is
        built; with both, the worker is ready."""
        size = self.models.manifest.preprocessing.input_size
        network_outputs(self.models, [np.zeros((size, size), dtype=np.float32)], self.networks)
        if self.pool is not None:
            self.pool.warm()

    @classmethod
    def from_bundle_dir(cls, storage_dir: Path, bundle_dir: Path, device: str = "auto", **options: Any) -> "StudyAnalyser":
        """``options``: the keyword arguments of the constructor after ``device``."""
        return cls(storage_dir, load_bundle(bundle_dir), device, **options)

    @classmethod
    def for_settings(cls, settings: "Settings", bundle_dir: Path) -> "StudyAnalyser":
        """The analyser a worker runs for ``bundle_dir`` with the speed settings of ``settings``."""
        return cls.from_bundle_dir(
            settings.storage_dir, bundle_dir, settings.device, batch_size=settings.inference_batch_size,
            # One study at a time (the solo pool): nobody else's images to wait for.
            batch_wait_s=settings.batch_wait_ms / 1000 if settings.worker_threads > 1 else 0.0,
            precision=settings.inference_precision,
            compile_networks=settings.torch_compile, backend=settings.inference_backend,
            onnx_cache=settings.onnx_cache, vocabulary=Vocabulary.from_settings(settings),
            lung_segmenter=configured_lung_segmenter(settings), pool=analysis_pool(settings.analysis_processes),
        )

    def analyse(
        self, study_uid: str, instances: list[dict[str, str]], options: AnalysisOptions | dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Analyse the instances; one image's failure is recorded for that image alone.

        ``options`` (:class:`~contract.messages.AnalysisOptions`, or their wire form): ``objects``
        names the per-image objects to write besides the SR and SEG ("GSPS", "SC"; default all),
        ``sc_heatmap`` adds the Grad-CAM heat map to the SC; ``supersedes`` (a re-analysis) names
        the study's earlier report, which the new one supersedes when another model made it;
        ``not_analysed_reason`` (a study whose analysis killed its worker twice,
        node/ledger/leases.py) writes the report of the images as not analysed, for that reason,
        without running the networks.
        """
        options = AnalysisOptions.from_message(options or {})
        refs = [InstanceRef.from_message(item) for item in instances]
        objects = set(options.objects or ALL_OBJECTS)
        heatmap = options.sc_heatmap
        identity = self.bundle.identity
        images: dict[str, ImageEntry] = {}
        headers: dict[str, pydicom.Dataset] = {}
        candidates: list[tuple[str, pydicom.Dataset]] = []
        # Images whose header did not tell the view: the picture is checked once decoded.
        view_unknown: set[str] = set()
        times = StageTimes()  # where this analysis spends its time: logged, and on the worker's /metrics
        started = time.perf_counter()
        for item in refs:
            sop_uid = item.sop_instance_uid
            entry = images[sop_uid] = ImageEntry(sop_instance_uid=sop_uid)
            try:
                path = self.store.path(item.storage_key)
                # Parsed once; the pixel data (and any other large value) is read from the file
                # only when used, so an ineligible image costs a header read.
                with times.timing("read"):
                    header = pydicom.dcmread(path, defer_size=DEFER_SIZE)
            except (OSError, ValueError, InvalidDicomError) as exc:
                # The reason goes into the report and the worklist: no path, no UID there.
                log.warning("cannot read stored instance %s: %s", ref(sop_uid), exc)
                entry.analysis_status = "failed"
                entry.analysis_reason = f"the stored instance cannot be read ({error_text(exc)})"
                continue
            headers[sop_uid] = header
            eligibility = assess(header, self.vocabulary)
            if eligibility.reason:
                entry.analysis_reason = eligibility.reason
                continue
            if not eligibility.view_known:
                view_unknown.add(sop_uid)
            candidates.append((sop_uid, header))

        crashed = options.not_analysed_reason
        if crashed:
            for sop_uid, _ in candidates:
                images[sop_uid].analysis_status, images[sop_uid].analysis_reason = "not_analysed", str(crashed)
            candidates = []
        results: list[ResultEntry] = []
        analysed: list[AnalysedImage] = []
        if self.pool is None:
            self._analyse_here(study_uid, candidates, view_unknown, images, objects, heatmap, results, analysed, times)
        else:
            self._analyse_in_pool(
                study_uid, candidates, view_unknown, images, objects, heatmap, results, analysed, times
            )

        # The report: every image of this analysis, analysed or not. Without it the analysis has
        # no answer, so a failure here fails the task (and is retried).
        skipped = [
            SkippedImage(sop_uid, entry.analysis_reason or entry.analysis_status, headers.get(sop_uid))
            for sop_uid, entry in images.items()
            if entry.analysis_status != "analysed"
        ]
        if analysed or any(image.source is not None for image in skipped):
            with times.timing("SR"):
                sr = build_sr(
                    analysed, skipped, identity, supersedes=self._superseded(options.supersedes),
                    variant=CRASHED_VARIANT if crashed else None,
                )
                results.append(store_result(self.store, study_uid, "SR", sr, None))
        times.observe()
        log.info(
            "study %s analysed: %d image(s) in %.0f ms (%s)", ref(study_uid), len(analysed),
            1000 * (time.perf_counter() - started), times.text(),
        )

        return AnalysisSummary(
            study_uid=study_uid,
            model=ReportedModel(
                name=identity.name, version=identity.version, synthetic_demo=identity.synthetic_demo
            ),
            images=list(images.values()),
            results=results,
            flagged=any(bool(e.flagged) for e in images.values()),
            analysed_at=analysed_now(),
        ).to_message()

    def _superseded(self, supersedes: ReportRef | None) -> SupersededReport | None:
        """The report a re-analysis replaces (the options' ``supersedes``, from the node), or None:
        none named, or it is this model version's own (the same model on the same images makes
        the same report, which supersedes nothing new)."""
        if supersedes is None or not supersedes.sop_instance_uid:
            return None
        identity = self.bundle.identity
        if (supersedes.model_name, supersedes.model_version) == (identity.name, identity.version):
            return None
        header = None
        try:
            header = pydicom.dcmread(
                self.store.path(supersedes.storage_key), stop_before_pixels=True,
                specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"],
            )
        except (KeyError, OSError, ValueError, InvalidDicomError) as exc:
            # The comment still names it; the Predecessor Documents Sequence needs its series.
            log.warning("cannot read the report a re-analysis supersedes: %s", error_text(exc))
        return SupersededReport(
            sop_instance_uid=supersedes.sop_instance_uid,
            sop_class_uid=supersedes.sop_class_uid or "",
            model_name=supersedes.model_name,
            model_version=supersedes.model_version,
            header=header,
        )

    def _analyse_here(
        self, study_uid: str, candidates: list[tuple[str, pydicom.Dataset]], view_unknown: set[str],
        images: dict[str, ImageEntry], objects: set[str], heatmap: bool, results: list[ResultEntry],
        analysed: list[AnalysedImage], times: StageTimes,
    ) -> None:
        """Decode, infer, measure and write in this process, batch after batch."""
        for batch, unreadable in self._decoded_batches(candidates, times):
            batch = self._frontal_only(batch, view_unknown, images, unreadable)
            if not batch:
                continue
            findings = self._findings(batch, times)
            for (sop_uid, dataset, image), finding in zip(batch, findings):
                try:
                    heat = gradcam_heatmap(self.models, image) if heatmap and "SC" in objects else None
                    seg, written = write_image_results(
                        self.store, self.bundle.identity, study_uid, sop_uid, dataset, image, finding, objects, heat,
                        times,
                    )
                except Exception as exc:
                    log.exception("cannot write the results of an image")
                    self._write_failed(images, sop_uid, error_text(exc))
                    continue
                results.extend(written)
                analysed.append(AnalysedImage(dataset, finding, seg))
                self._record_analysed(images, sop_uid, finding)

    def _analyse_in_pool(
        self, study_uid: str, candidates: list[tuple[str, pydicom.Dataset]], view_unknown: set[str],
        images: dict[str, ImageEntry], objects: set[str], heatmap: bool, results: list[ResultEntry],
        analysed: list[AnalysedImage], times: StageTimes,
    ) -> None:
        """The same with the pool: the pool processes decode each image into shared memory, a batch
        ahead of the forward pass; this process runs the networks, maps and measures the masks (and
        any Grad-CAM: the networks are here), and hands each image's objects to the pool to build and
        write while it goes on with the next batch. Every block is unlinked before this returns."""
        assert self.pool is not None
        pool = self.pool
        recipe = self.bundle.manifest.preprocessing
        chunks = [candidates[start : start + self.batch_size] for start in range(0, len(candidates), self.batch_size)]
        blocks: list[SharedArray] = []
        held: dict[str, SharedArray] = {}  # each decoded image's block
        decoding: deque[list[tuple[str, pydicom.Dataset, SharedArray | None, Future | None]]] = deque()
        # (SOP Instance UID, header, finding, the write job, the blocks it maps), in the order of the images
        writing: list[tuple[str, pydicom.Dataset, ImageFinding, Future, list[SharedArray]]] = []

        def submit_decodes(chunk: list[tuple[str, pydicom.Dataset]]) -> None:
            jobs = []
            for sop_uid, header in chunk:
                shape = _source_shape(header)
                if shape is None:  # no usable Rows and Columns: decoded here, where that is reported
                    jobs.append((sop_uid, header, None, None))
                    continue
                block = held[sop_uid] = SharedArray(shape)
                blocks.append(block)
                jobs.append((sop_uid, header, block, pool.submit(decode_job, str(header.filename), recipe, block.handle)))
            decoding.append(jobs)

        try:
            for chunk in chunks[:2]:
                submit_decodes(chunk)
            for index in range(len(chunks)):
                batch, unreadable = self._collect_decodes(decoding.popleft(), held, times)
                if index + 2 < len(chunks):
                    submit_decodes(chunks[index + 2])
                batch = self._frontal_only(batch, view_unknown, images, unreadable)
                if not batch:
                    continue
                findings = self._findings(batch, times)
                for (sop_uid, dataset, image), finding in zip(batch, findings):
                    block = held.pop(sop_uid)
                    used = [block]
                    heat = None
                    if heatmap and "SC" in objects:
                        try:
                            heat_map = gradcam_heatmap(self.models, image)
                        except Exception as exc:
                            log.exception("cannot write the results of an image")
                            self._write_failed(images, sop_uid, error_text(exc))
                            block.release()
                            continue
                        heat = SharedArray(heat_map.shape, heat_map.dtype)
                        blocks.append(heat)
                        heat.array[...] = heat_map  # type: ignore[index]
                        used.append(heat)
                    job = pool.submit(
                        write_job, str(self.storage_dir), self.bundle.identity, study_uid, sop_uid, str(dataset.filename),
                        block.handle, dataclasses.replace(finding, mask=np.zeros((0, 0), dtype=bool)),
                        CompactMask.of(finding.mask), frozenset(objects), None if heat is None else heat.handle,
                    )
                    writing.append((sop_uid, dataset, finding, job, used))
                del batch, findings
                # Blocks of images already written are freed as the study goes on; when the pool
                # writes slower than the networks run, the next batch waits for it, so that at most
                # about four batches of images are in shared memory (this one, two decoding, one writing).
                unwritten = [(job, used) for *_, job, used in writing if any(b.array is not None for b in used)]
                for number, (job, used) in enumerate(unwritten):
                    if number < len(unwritten) - self.batch_size:
                        wait([job])
                    if job.done():
                        for block in used:
                            block.release()
            for sop_uid, dataset, finding, job, used in writing:
                written, error, trace, seconds = pool.result(job)
                times.merge(seconds)
                for block in used:
                    block.release()
                if written is None:
                    log.error("cannot write the results of an image\n%s", trace)
                    self._write_failed(images, sop_uid, error or "unknown error")
                    continue
                results.extend(written)
                analysed.append(AnalysedImage(dataset, finding, self._written_seg(written)))
                self._record_analysed(images, sop_uid, finding)
        finally:
            for jobs in decoding:
                for *_, future in jobs:
                    if future is not None:
                        future.cancel()
            for *_, job, _ in writing:
                job.cancel()
            for block in [*blocks, *held.values()]:
                block.release()

    def _collect_decodes(
        self, jobs: list[tuple[str, pydicom.Dataset, SharedArray | None, Future | None]], held: dict[str, SharedArray],
        times: StageTimes,
    ) -> tuple[list[tuple[str, pydicom.Dataset, Any]], list[tuple[str, str]]]:
        """The decoded images of one batch of decode jobs (views of their blocks, ``held`` by SOP
        Instance UID), and the reasons of those that failed."""
        assert self.pool is not None
        decoded, unreadable = [], []
        for sop_uid, header, block, future in jobs:
            if future is None or block is None:  # decoded here: into a block too, for the write job
                here, failed = self._decode([(sop_uid, header)], times)
                unreadable.extend(failed)
                for _, dataset, image in here:
                    block = held[sop_uid] = SharedArray(np.shape(image))
                    block.array[...] = image  # type: ignore[index]
                    decoded.append((sop_uid, dataset, block.array))
                continue
            reason, warning, seconds = self.pool.result(future)
            times.add("decode", seconds)
            if warning:
                log.warning("cannot read the pixel data of %s: %s", ref(sop_uid), warning)
            if reason is not None:
                block.release()
                unreadable.append((sop_uid, reason))
                continue
            decoded.append((sop_uid, header, block.array))
        return decoded, unreadable

    def _written_seg(self, written: list[ResultEntry]) -> pydicom.Dataset | None:
        """The SEG a pool process wrote, read back (header only: what the report references)."""
        for entry in written:
            if entry.kind == "SEG":
                return pydicom.dcmread(self.store.path(entry.storage_key), stop_before_pixels=True)
        return None

    def _frontal_only(
        self, batch: list[tuple[str, pydicom.Dataset, Any]], view_unknown: set[str], images: dict[str, ImageEntry],
        unreadable: list[tuple[str, str]],
    ) -> list[tuple[str, pydicom.Dataset, Any]]:
        """``batch`` less the images whose header told no view and whose picture does not look
        frontal; those and the ``unreadable`` are recorded as not analysed, with the reason."""
        not_frontal = [
            (sop_uid, reason)
            for sop_uid, _, image in batch
            if sop_uid in view_unknown and (reason := frontal_check_reason(image))
        ]
        refused = {sop_uid for sop_uid, _ in not_frontal}
        for sop_uid, reason in unreadable + not_frontal:
            images[sop_uid].analysis_status, images[sop_uid].analysis_reason = "not_analysed", reason
        return [item for item in batch if item[0] not in refused]

    def _findings(self, batch: list[tuple[str, pydicom.Dataset, Any]], times: StageTimes) -> list[ImageFinding]:
        """The networks' findings of ``batch``: the forward pass (with other studies' images when
        they share it) timed as ``forward``, the rest (the mask to the source grid, measuring) as ``measure``."""
        in_forward = StageTimes()

        def forward(images: Any) -> Any:
            with in_forward.timing("forward"):
                return self.batcher.run(images)

        started = time.perf_counter()
        findings = predict_images(
            self.models, [image for _, _, image in batch], [ds for _, ds, _ in batch], batch_size=self.batch_size,
            forward=forward, lung_segmenter=self.lung_segmenter,
        )
        forward_seconds = in_forward.seconds.get("forward", 0.0)
        times.add("forward", forward_seconds)
        times.add("measure", time.perf_counter() - started - forward_seconds)
        return findings

    @staticmethod
    def _write_failed(images: dict[str, ImageEntry], sop_uid: str, error: str) -> None:
        images[sop_uid].analysis_status = "failed"
        images[sop_uid].analysis_reason = f"its results could not be written ({error})"

    @staticmethod
    def _record_analysed(images: dict[str, ImageEntry], sop_uid: str, finding: ImageFinding) -> None:
        images[sop_uid] = ImageEntry(
            sop_instance_uid=sop_uid,
            analysis_status="analysed",
            probability=round(float(finding.probability), 6),
            flagged=bool(finding.flagged),
            area_px=int(finding.area_px),
            area_cm2=_rounded(finding.area_cm2, 3),
            side=finding.side,
            gap_mm=_rounded(finding.gap_mm, 2),
            hemithorax_fraction=_rounded(finding.hemithorax_fraction, 4),
            analysis_reason=finding.decision,
        )
        log.info("image analysed: p=%.3f flagged=%s area_px=%d", finding.probability, finding.flagged, finding.area_px)

    def _decode(
        self, chunk: list[tuple[str, pydicom.Dataset]], times: StageTimes | None = None
    ) -> tuple[list[tuple[str, pydicom.Dataset, Any]], list[tuple[str, str]]]:
        """The decoded images of ``chunk``, and (SOP Instance UID, reason) of those that cannot be decoded."""
        times = times or StageTimes()
        recipe = self.bundle.manifest.preprocessing
        decoded, unreadable = [], []
        for sop_uid, dataset in chunk:
            with times.timing("decode"):
                image, reason, warning = decode_image(dataset, recipe)
            if warning:
                log.warning("cannot read the pixel data of %s: %s", ref(sop_uid), warning)
            if image is None:
                unreadable.append((sop_uid, reason or "unreadable image"))
                continue
            decoded.append((sop_uid, dataset, image))
        return decoded, unreadable

    def _decoded_batches(
        self, candidates: list[tuple[str, pydicom.Dataset]], times: StageTimes | None = None
    ) -> Iterator[tuple[list[tuple[str, pydicom.Dataset, Any]], list[tuple[str, str]]]]:
        """:meth:`_decode` of each batch of ``candidates``, in order. On CUDA the next batch is
        decoded in a helper thread while the caller runs the networks on this one (the GPU computes
        while the CPU decodes); on the CPU, where both would compete for the same cores, one after
        the other."""
        times = times or StageTimes()
        chunks = [candidates[start : start + self.batch_size] for start in range(0, len(candidates), self.batch_size)]
        if self.models.device.type != "cuda" or len(chunks) < 2:
            for chunk in chunks:
                yield self._decode(chunk, times)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="pleura-decode") as prefetch:
            upcoming = prefetch.submit(self._decode, chunks[0], times)
            for index in range(len(chunks)):
                current = upcoming.result()
                if index + 1 < len(chunks):
                    upcoming = prefetch.submit(self._decode, chunks[index + 1], times)
                yield current


def _source_shape(header: pydicom.Dataset) -> tuple[int, int] | None:
    """(Rows, Columns) of ``header``, or None when it has no usable pair."""
    try:
        rows, columns = int(header.Rows), int(header.Columns)
    except (AttributeError, TypeError, ValueError):
        return None
    return (rows, columns) if rows > 0 and columns > 0 else None
