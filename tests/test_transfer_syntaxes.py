"""JPEG-LS and HTJ2K end to end: a real chest radiograph encoded in each, sent by a real peer
proposing exactly that transfer syntax, accepted, stored as sent, decoded by the worker to the
original's pixels (lossless) or close to them (near-lossless, lossy), and analysed with the
original's decision."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL, JPEGLSLossless, JPEGLSNearLossless

import dicom_peers
from scp_node import Node
from test_node_scp import CR, pynetdicom_store
from contract.bundle import Preprocessing
from contract.preprocess import decode_radiograph
from worker.analysis import StudyAnalyser

SOURCE = "RG1_UNCR.dcm"  # a real chest CR, MONOCHROME1, 15 bits stored, uncompressed

# name: (transfer syntax, largest difference allowed from the original's stored values)
ENCODINGS = {
    "jpeg-ls-lossless": (JPEGLSLossless, 0),
    "jpeg-ls-near-lossless": (JPEGLSNearLossless, 2),  # dcmcjpls' NEAR = 2
    "htj2k-lossless": (HTJ2KLossless, 0),
    "htj2k-lossless-rpcl": (HTJ2KLosslessRPCL, 0),
    "htj2k": (HTJ2K, 64),  # irreversible, quantisation step 0.0005 of the 15-bit range
}


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (Debian package {package}; ./scripts/setup.sh installs it)")
    return path


def _jpeg_ls(source: Path, target: Path, near_lossless: bool) -> None:
    options = ["+en", "+md", "2"] if near_lossless else ["+el"]
    done = subprocess.run([_tool("dcmcjpls", "dcmtk"), *options, str(source), str(target)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _htj2k(source: Path, target: Path, transfer_syntax: str) -> None:
    """OpenJPH's ojph_compress makes the code stream (from a PGM of the stored values), wrapped here
    in the source's header. RPCL is the progression order transfer syntax .202 requires."""
    ds = pydicom.dcmread(source)
    pixels = ds.pixel_array
    pgm = target.with_suffix(".pgm")
    header = f"P5\n{pixels.shape[1]} {pixels.shape[0]}\n{(1 << ds.BitsStored) - 1}\n".encode()
    pgm.write_bytes(header + pixels.astype(">u2").tobytes())
    options = {
        HTJ2KLossless: ["-reversible", "true", "-prog_order", "LRCP"],
        HTJ2KLosslessRPCL: ["-reversible", "true", "-prog_order", "RPCL"],
        HTJ2K: ["-reversible", "false", "-qstep", "0.0005"],
    }[transfer_syntax]
    stream = target.with_suffix(".j2c")
    done = subprocess.run(
        [_tool("ojph_compress", "openjph-tools"), "-i", str(pgm), "-o", str(stream), *options],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    ds.PixelData = encapsulate([stream.read_bytes()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    if transfer_syntax == HTJ2K:
        ds.LossyImageCompression = "01"
    ds.save_as(target, enforce_file_format=True)


@pytest.fixture(scope="module")
def original() -> pydicom.Dataset:
    return pydicom.dcmread(dicom_peers.testdata_file(SOURCE))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> dict[str, Path]:
    """The source radiograph in each encoding, made once for the module."""
    folder = tmp_path_factory.mktemp("encoded")
    source = dicom_peers.testdata_file(SOURCE)
    files = {}
    for name, (transfer_syntax, _) in ENCODINGS.items():
        target = folder / f"{name}.dcm"
        if transfer_syntax in (JPEGLSLossless, JPEGLSNearLossless):
            _jpeg_ls(source, target, near_lossless=transfer_syntax == JPEGLSNearLossless)
        else:
            _htj2k(source, target, transfer_syntax)
        assert pydicom.dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID == transfer_syntax
        files[name] = target
    return files


def _assert_stored_as_sent(node: Node, sent: Path, transfer_syntax: str, original: pydicom.Dataset, tolerance: int) -> None:
    sent_ds = pydicom.dcmread(sent)
    [instance] = node.ledger.list_instances(sent_ds.StudyInstanceUID)
    assert instance.transfer_syntax_uid == transfer_syntax
    stored = pydicom.dcmread(node.store.path(instance.storage_key))
    assert stored.file_meta.TransferSyntaxUID == transfer_syntax
    assert stored.PixelData == sent_ds.PixelData  # the code stream as sent, not recompressed
    difference = np.abs(stored.pixel_array.astype(np.int32) - original.pixel_array.astype(np.int32))
    assert difference.max() <= tolerance
    if tolerance:
        assert difference.any(), "a lossy encoding that changed nothing proves nothing"


@pytest.mark.parametrize(("name", "option"), [("jpeg-ls-lossless", "-xt"), ("jpeg-ls-near-lossless", "-xu")])
def test_storescu_sends_jpeg_ls_in_its_own_transfer_syntax(
    node: Node, encoded: dict[str, Path], original: pydicom.Dataset, name: str, option: str
) -> None:
    transfer_syntax, tolerance = ENCODINGS[name]

    # -R: propose only the contexts the file needs, here JPEG-LS (and no fall-back to uncompressed)
    sent = dicom_peers.storescu(node.port, [encoded[name]], called_ae="PLEURA", options=[option, "-R"])

    assert sent.returncode == 0, sent.stderr
    assert "Received Store Response (Success)" in sent.stderr
    _assert_stored_as_sent(node, encoded[name], transfer_syntax, original, tolerance)


@pytest.mark.parametrize("name", ["htj2k-lossless", "htj2k-lossless-rpcl", "htj2k"])
def test_htj2k_is_accepted_and_stored_as_sent(
    node: Node, encoded: dict[str, Path], original: pydicom.Dataset, name: str
) -> None:
    # DCMTK 3.6.7's storescu does not know the HTJ2K transfer syntaxes: pynetdicom proposes exactly one.
    transfer_syntax, tolerance = ENCODINGS[name]

    status = pynetdicom_store(node.port, encoded[name], CR, transfer_syntax)

    assert status.Status == 0x0000
    _assert_stored_as_sent(node, encoded[name], transfer_syntax, original, tolerance)


def test_the_worker_decodes_every_accepted_encoding_like_the_original(
    encoded: dict[str, Path], original: pydicom.Dataset
) -> None:
    recipe = Preprocessing()
    reference = decode_radiograph(original, recipe)
    for name, path in encoded.items():
        _, tolerance = ENCODINGS[name]
        image = decode_radiograph(pydicom.dcmread(path), recipe)
        assert image.shape == reference.shape, name
        if tolerance:
            # in [0, 1] over the window: a few stored values' worth of difference
            assert np.abs(image - reference).max() < 0.02, name
        else:
            np.testing.assert_array_equal(image, reference, err_msg=name)


def test_the_analysis_of_a_lossless_encoding_is_the_original_s(
    tmp_path: Path, demo_bundle: Path, encoded: dict[str, Path]
) -> None:
    """The worker's whole analysis, in process, on the radiograph uncompressed, in JPEG-LS lossless
    and in HTJ2K lossless: each gets its report, with the original's decision."""
    analyser = StudyAnalyser.from_bundle_dir(tmp_path, demo_bundle, device="cpu")
    sources = {"uncompressed": dicom_peers.testdata_file(SOURCE)}
    sources.update({name: encoded[name] for name in ("jpeg-ls-lossless", "htj2k-lossless")})
    found = {}
    for name, source in sources.items():
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        key = f"instances/encodings/{name}.dcm"
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp_path / key)
        summary = analyser.analyse(
            str(ds.StudyInstanceUID), [{"sop_instance_uid": str(ds.SOPInstanceUID), "key": key}], {"objects": ["SR"]}
        )
        [image] = summary["images"]
        assert image["status"] == "analysed", (name, image)
        [report] = [result for result in summary["results"] if result["kind"] == "SR"]
        assert pydicom.dcmread(tmp_path / report["key"]).Modality == "SR", name
        found[name] = (image["flagged"], image["probability"], image["area_px"], image["reason"])
    assert found["jpeg-ls-lossless"] == found["uncompressed"]
    assert found["htj2k-lossless"] == found["uncompressed"]
