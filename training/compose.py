"""A bundle made of two others' networks: the classifier of one, the U-Net of another.

`pleura models compose CLASSIFIER SEGMENTER` pairs, say, a published torchxrayvision classifier
(`pleura models fetch`, classifier-only) with a U-Net trained elsewhere, so that a site without a
training set of its own gets both a decision and a segmentation. Each source is a registered version
(``NAME/VERSION``, or ``VERSION`` when unique; its files are checked against the registry's
checksums first) or a bundle directory.

The two networks keep their own input grids (size, crop, normalisation, CLAHE) as the manifest's
per-network ``input``; what they must share is the decoding of the stored image (VOI, MONOCHROME1
inversion), which the worker does once per image. Two recipes that decode differently are refused
with the reason. The decision thresholds come from where they were tuned: the probability from the
classifier's bundle, the mask threshold and minimum area from the segmenter's. The manifest records
each network's source version, its file and the file's SHA-256 (``components``), and every result
made with the bundle names both networks (the SR's and SEG's Algorithm Identification).

The composed bundle is imported into the registry like any version, never promoted: the pair was
never validated together, so it is evaluated (`pleura evaluate`) and tuned before anyone promotes it.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from config.errors import PleuraError
from contract.active import checksum_problems
from contract.bundle import (
    DEMO_INTENDED_USE,
    Bundle,
    BundleError,
    ComponentSource,
    Manifest,
    NetworkInput,
    NetworkSpec,
    Preprocessing,
    Thresholds,
    load_bundle,
    write_manifest,
)

__all__ = ["ComposeError", "compose_bundle", "compose_into_registry"]

INTENDED_USE = (
    "research use; validate locally: networks composed from two bundles and not validated together - "
    "evaluate and tune the pair on local data before any use"
)
DECODING = ("voi", "invert_monochrome1")
"""What both networks' recipes must agree on: the worker decodes each image once for both."""


class ComposeError(PleuraError, ValueError):
    """Two networks cannot be composed into one bundle; one line saying why."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_source(ref: str, registry=None) -> Bundle:
    """A bundle directory, or a registered version (checked against its recorded checksums)."""
    path = Path(ref)
    if path.is_dir():
        return load_bundle(path)
    if registry is None:
        raise ComposeError(f"{ref}: no bundle directory of that name (and no registry to look the version up in)")
    record = registry.find(ref)
    folder = registry.version_dir(record)
    problems = checksum_problems(folder, record.files)
    if problems:
        raise ComposeError(f"version {record.id} is damaged: {problems[0]}")
    return load_bundle(folder)


def _own_input(manifest: Manifest, spec: NetworkSpec) -> NetworkInput:
    recipe = manifest.network_preprocessing(spec)
    return NetworkInput(
        input_size=recipe.input_size, channels=recipe.channels, normalisation=recipe.normalisation,
        mean=recipe.mean, std=recipe.std, value_range=recipe.value_range, crop=recipe.crop, resize=recipe.resize,
        clahe=recipe.clahe, clahe_clip_limit=recipe.clahe_clip_limit,
    )


def _component(role: str, bundle: Bundle, spec: NetworkSpec) -> ComponentSource:
    m = bundle.manifest
    return ComponentSource(
        role=role, name=m.name, version=m.version, weights_file=spec.weights_file,
        sha256=_sha256(bundle.weights_path(spec)), synthetic_demo=m.synthetic_demo, provenance=m.provenance,
    )


def compose_bundle(classifier_from: Bundle, segmenter_from: Bundle, out_dir: Path,
                   name: str | None = None) -> Path:
    """Write a bundle in ``out_dir`` with ``classifier_from``'s classifier and ``segmenter_from``'s
    segmenter; :class:`ComposeError` (one line) when a network is missing or the two cannot share
    decoding."""
    cm, sm = classifier_from.manifest, segmenter_from.manifest
    for bundle, role in ((classifier_from, "classifier"), (segmenter_from, "segmenter")):
        m = bundle.manifest
        if m.kind != "radiograph":
            raise ComposeError(f"{m.name}/{m.version} is a {m.kind} bundle: only radiograph networks are composed")
        if getattr(m, role) is None:
            raise ComposeError(f"{m.name}/{m.version} has no {role} to take (it is {_networks(m)})")
    classifier_recipe = cm.network_preprocessing(cm.classifier)
    segmenter_recipe = sm.network_preprocessing(sm.segmenter)
    for field in DECODING:
        theirs, ours = getattr(classifier_recipe, field), getattr(segmenter_recipe, field)
        if theirs != ours:
            raise ComposeError(
                f"the two networks cannot share decoding: {field} is {theirs!r} for the classifier of "
                f"{cm.name}/{cm.version} but {ours!r} for the segmenter of {sm.name}/{sm.version}"
            )
    # CLAHE after decoding is per network; done once for both when they apply it alike.
    shared_clahe = (classifier_recipe.clahe and segmenter_recipe.clahe
                    and classifier_recipe.clahe_clip_limit == segmenter_recipe.clahe_clip_limit)
    preprocessing = Preprocessing(
        input_size=segmenter_recipe.input_size, channels=segmenter_recipe.channels,
        voi=segmenter_recipe.voi, invert_monochrome1=segmenter_recipe.invert_monochrome1,
        clahe=shared_clahe, clahe_clip_limit=segmenter_recipe.clahe_clip_limit,
    )
    components = [_component("classifier", classifier_from, cm.classifier),
                  _component("segmenter", segmenter_from, sm.segmenter)]
    classifier = cm.classifier.model_copy(update={"weights_file": "classifier.pt", "input": _own_input(cm, cm.classifier)})
    segmenter = sm.segmenter.model_copy(update={"weights_file": "segmenter.pt", "input": _own_input(sm, sm.segmenter)})
    synthetic = cm.synthetic_demo or sm.synthetic_demo
    pair = hashlib.sha256("".join(c.sha256 for c in components).encode()).hexdigest()
    manifest = Manifest(
        name=name or f"{cm.name}+{sm.name}",
        version=f"c{pair[:12]}",  # the same two files give the same version: composing twice adds nothing
        intended_use=DEMO_INTENDED_USE if synthetic else INTENDED_USE,
        synthetic_demo=synthetic,
        manufacturer=cm.manufacturer if cm.manufacturer == sm.manufacturer else "Pleura",
        created=None,  # the same pair gives the same files (the registry records when it was imported)
        preprocessing=preprocessing,
        classifier=classifier,
        segmenter=segmenter,
        thresholds=Thresholds(
            probability=cm.thresholds.probability, mask=sm.thresholds.mask, min_area_px=sm.thresholds.min_area_px,
        ),
        training_data=f"classifier: {cm.training_data or 'not stated'}; segmenter: {sm.training_data or 'not stated'}",
        licence="; ".join(text for text in (cm.licence, sm.licence) if text),
        provenance={"composed": "pleura models compose"},
        components=components,
        tuning={"status": "not tuned as a pair",
                "probability": f"from {cm.name}/{cm.version}", "mask": f"from {sm.name}/{sm.version}"},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(classifier_from.weights_path(cm.classifier), out_dir / classifier.weights_file)
    shutil.copyfile(segmenter_from.weights_path(sm.segmenter), out_dir / segmenter.weights_file)
    write_manifest(out_dir, manifest)
    load_bundle(out_dir)  # the manifest it wrote must read back
    return out_dir


def _networks(m: Manifest) -> str:
    if m.classifier_only:
        return "classifier-only"
    return "segmenter-only" if m.classifier is None else "classifier and segmenter"


def compose_into_registry(registry, classifier_ref: str, segmenter_ref: str, name: str | None = None,
                          by: str | None = None):
    """Compose the two sources (registered versions or bundle directories) and import the result
    into ``registry`` (not promoted): (record, newly added)."""
    classifier_from = resolve_source(classifier_ref, registry)
    segmenter_from = resolve_source(segmenter_ref, registry)
    with tempfile.TemporaryDirectory(prefix="pleura-compose-") as tmp:
        try:
            bundle = compose_bundle(classifier_from, segmenter_from, Path(tmp) / "composed", name)
        except BundleError as exc:
            raise ComposeError(str(exc)) from None
        return registry.import_bundle(bundle, by=by)
