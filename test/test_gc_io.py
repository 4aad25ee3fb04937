"""Grand Challenge sockets: inputs.json with JSON, text and image sockets; outputs; clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
import SimpleITK as sitk

from extractor.gc_io import (
    INPUTS_JSON,
    ImageData,
    Socket,
    SocketError,
    inputs_json,
    load_image,
    output_path,
    parse_inputs_json,
    read_inputs,
    write_image,
    write_json,
    write_text,
)

REPORT = Socket("radiology-report", "radiology-report.json", "Value", "String")
AGE = Socket("patient-age", "patient-age.json", "Value", "Integer")
CLINICAL = Socket("clinical-information", "clinical-information.json", "File", "Anything")
NOTES = Socket("referral-notes", "referral-notes", "File", "Anything")
CT = Socket("ct-image", "images/ct", "Image", "Image")
MASK = Socket("lesion-segmentation", "images/lesion-segmentation", "Image", "Segmentation")

CT_SPACING = (0.7, 0.8, 2.5)
CT_ORIGIN = (-120.5, 33.25, -900.0)
CT_DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _image(array: np.ndarray, spacing, origin, direction, **tags: str) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    for key, value in tags.items():
        image.SetMetaData(key.replace("_", "|"), value)
    return image


@pytest.fixture
def job(tmp_path: Path) -> dict:
    """An /input folder as the platform provisions it, plus what was put in."""
    folder = tmp_path / "input"
    (folder / CT.relative_path).mkdir(parents=True)
    (folder / MASK.relative_path).mkdir(parents=True)
    rng = np.random.default_rng(7)
    ct = rng.integers(-1024, 2000, size=(6, 9, 11), dtype=np.int16)  # z, y, x
    mask = (rng.random((6, 9, 11)) > 0.7).astype(np.uint8)
    ct_path = folder / CT.relative_path / "1c7e4e4a-0b7b-4c55-9a43-3e2a52a4c0a1.mha"
    sitk.WriteImage(
        _image(ct, CT_SPACING, CT_ORIGIN, CT_DIRECTION, **{"0008_0060": "CT", "0018_0015": "CHEST"}),
        str(ct_path),
        useCompression=True,
    )
    mask_path = folder / MASK.relative_path / "mask.nii.gz"
    sitk.WriteImage(_image(mask, (1.5, 1.5, 3.0), (10.0, -20.0, 5.0), CT_DIRECTION), str(mask_path))
    report = "CT thorax: solid nodule of 14 mm in the right upper lobe."
    clinical = {"age": 64, "smoker": True, "history": ["COPD"]}
    (folder / REPORT.relative_path).write_bytes(orjson.dumps(report))
    (folder / AGE.relative_path).write_bytes(orjson.dumps(64))
    (folder / CLINICAL.relative_path).write_bytes(orjson.dumps(clinical))
    (folder / NOTES.relative_path).write_text("Referral: cough for 3 months.\nQuestion: nodule?", encoding="utf-8")
    manifest = inputs_json(
        [(REPORT, report), (AGE, 64), (CLINICAL, None), (NOTES, None), (CT, ct_path.name), (MASK, mask_path.name)]
    )
    del manifest[1]["socket"]  # an item only in the legacy "interface" form still reads
    (folder / INPUTS_JSON).write_bytes(orjson.dumps(manifest))
    return {"dir": folder, "ct": ct, "mask": mask, "report": report, "clinical": clinical}


def test_inputs_json_resolves_every_socket_by_slug(job: dict) -> None:
    inputs = read_inputs(job["dir"])
    assert set(inputs.slugs) == {s.slug for s in (REPORT, AGE, CLINICAL, NOTES, CT, MASK)}
    assert inputs.socket("ct-image") == CT
    assert inputs.text("radiology-report") == job["report"]
    assert inputs.json("patient-age") == 64
    assert inputs.json("clinical-information") == job["clinical"]
    assert inputs.text("referral-notes").startswith("Referral: cough")
    assert inputs.path("clinical-information") == job["dir"] / "clinical-information.json"


def test_value_sockets_prefer_the_inline_value_and_fall_back_to_the_file(job: dict) -> None:
    (job["dir"] / REPORT.relative_path).write_bytes(orjson.dumps("from the file"))
    assert read_inputs(job["dir"]).text("radiology-report") == job["report"]  # inline wins
    manifest = orjson.loads((job["dir"] / INPUTS_JSON).read_bytes())
    manifest[0]["value"] = None
    (job["dir"] / INPUTS_JSON).write_bytes(orjson.dumps(manifest))
    assert read_inputs(job["dir"]).text("radiology-report") == "from the file"


def test_mha_image_round_trips_array_and_geometry(job: dict) -> None:
    image = read_inputs(job["dir"]).image("ct-image")
    np.testing.assert_array_equal(image.array, job["ct"])
    assert image.spacing == pytest.approx(CT_SPACING)
    assert image.origin == pytest.approx(CT_ORIGIN)
    assert image.direction == pytest.approx(CT_DIRECTION)
    assert image.size == (11, 9, 6) and image.extent_mm == pytest.approx((7.7, 7.2, 15.0))
    assert image.metadata["0008|0060"] == "CT" and image.metadata["0018|0015"] == "CHEST"
    assert not any(v.startswith("[UNKNOWN") for v in image.metadata.values())
    assert image.pixel_type == "16-bit signed integer"
    assert not image.array.flags.writeable


def test_nifti_image_round_trips_array_and_geometry(job: dict) -> None:
    image = read_inputs(job["dir"]).image("lesion-segmentation")
    np.testing.assert_array_equal(image.array, job["mask"])
    assert image.spacing == pytest.approx((1.5, 1.5, 3.0))
    assert image.origin == pytest.approx((10.0, -20.0, 5.0))
    assert image.direction == pytest.approx(CT_DIRECTION, abs=1e-6)
    assert image.path is not None and image.path.name == "mask.nii.gz"


def test_outputs_land_at_their_relative_paths(tmp_path: Path, job: dict) -> None:
    out = tmp_path / "output"
    findings = Socket("findings", "findings.json", "Value", "Anything")
    path = write_json(out, findings, {"probability": np.float32(0.25), "labels": ["nodule"]})
    assert path == output_path(out, findings) == out / "findings.json"
    assert orjson.loads(path.read_bytes()) == {"probability": 0.25, "labels": ["nodule"]}
    text = write_text(out, Socket("summary-text", "nested/summary.txt", "File"), "one line\n")
    assert text.read_text() == "one line\n"

    segmentation = Socket("output-segmentation", "images/output-segmentation", "Image", "Segmentation")
    source = read_inputs(job["dir"]).image("ct-image")
    written = write_image(out, segmentation, source)
    assert written == out / "images" / "output-segmentation" / "output.mha"
    back = load_image(written)
    np.testing.assert_array_equal(back.array, job["ct"])
    assert back.spacing == pytest.approx(CT_SPACING) and back.origin == pytest.approx(CT_ORIGIN)
    assert back.direction == pytest.approx(CT_DIRECTION) and back.metadata["0018|0015"] == "CHEST"

    plain = write_image(out, Socket("heat", "images/heat", "Image", "Heat Map"), np.eye(4, 3, dtype=np.float32))
    assert load_image(plain).size == (3, 4)
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert leftovers == [], "temporary files must not remain next to the outputs"


def test_image_data_converts_back_to_simpleitk() -> None:
    data = ImageData(
        array=np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        spacing=(1.0, 2.0, 3.0),
        origin=(0.0, 0.0, 0.0),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        metadata={"0008|0060": "MR"},
    )
    image = data.to_sitk()
    assert image.GetSize() == (4, 3, 2) and image.GetSpacing() == (1.0, 2.0, 3.0)
    assert image.GetMetaData("0008|0060") == "MR"


def test_a_missing_socket_names_inputs_json_the_slug_and_what_is_there(job: dict) -> None:
    inputs = read_inputs(job["dir"])
    with pytest.raises(SocketError) as err:
        inputs.image("mr-image")
    message = str(err.value)
    assert str(job["dir"] / INPUTS_JSON) in message and "'mr-image'" in message and "ct-image" in message


def test_an_unreadable_image_names_the_file_and_the_socket(job: dict) -> None:
    bad = job["dir"] / CT.relative_path
    for f in bad.iterdir():
        f.unlink()
    (bad / "broken.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nnot an image\n")
    with pytest.raises(SocketError) as err:
        read_inputs(job["dir"]).image("ct-image")
    message = str(err.value)
    assert str(bad / "broken.mha") in message and "'ct-image'" in message and "expected an image" in message


def test_image_folders_need_exactly_one_image(job: dict) -> None:
    folder = job["dir"] / CT.relative_path
    for f in folder.iterdir():
        f.unlink()
    inputs = read_inputs(job["dir"])
    with pytest.raises(SocketError, match=r"ct-image.*expected exactly one image file.*found none"):
        inputs.image("ct-image")
    (folder / "a.mha").write_bytes(b"")
    (folder / "b.mha").write_bytes(b"")
    with pytest.raises(SocketError, match=r"found a\.mha, b\.mha"):
        inputs.image_path("ct-image")
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    with pytest.raises(SocketError, match=r"missing image folder for socket 'ct-image'"):
        inputs.image("ct-image")


def test_bad_json_files_and_wrong_socket_uses_are_explained(job: dict) -> None:
    (job["dir"] / CLINICAL.relative_path).write_text("{not json")
    inputs = read_inputs(job["dir"])
    with pytest.raises(SocketError, match=r"clinical-information\.json: socket 'clinical-information': expected JSON"):
        inputs.json("clinical-information")
    (job["dir"] / CLINICAL.relative_path).unlink()
    with pytest.raises(SocketError, match=r"missing file for socket 'clinical-information'"):
        inputs.json("clinical-information")
    with pytest.raises(SocketError, match=r"'ct-image' is an image socket"):
        inputs.json("ct-image")
    with pytest.raises(SocketError, match=r"'patient-age'.*expected a string, got int"):
        inputs.text("patient-age")
    with pytest.raises(SocketError, match=r"'radiology-report' has super_kind 'Value', not an image"):
        inputs.image("radiology-report")


def test_malformed_inputs_json_is_reported(tmp_path: Path) -> None:
    (tmp_path / INPUTS_JSON).write_text("[{")
    with pytest.raises(SocketError, match="inputs.json: malformed JSON"):
        read_inputs(tmp_path)
    with pytest.raises(SocketError, match="expected a JSON array"):
        parse_inputs_json({"slug": "x"}, "inputs.json")
    with pytest.raises(SocketError, match=r"item 0: socket field\(s\) relative_path"):
        parse_inputs_json([{"socket": {"slug": "x", "super_kind": "Value"}}], "inputs.json")
    with pytest.raises(SocketError, match="must stay inside the folder"):
        parse_inputs_json([{"socket": {"slug": "x", "super_kind": "File", "relative_path": "../etc/x"}}], "in")
    twice = inputs_json([(REPORT, "a"), (REPORT, "b")])
    with pytest.raises(SocketError, match="listed twice"):
        parse_inputs_json(twice, "inputs.json")


def test_without_inputs_json_known_sockets_are_assumed(job: dict) -> None:
    (job["dir"] / INPUTS_JSON).unlink()
    with pytest.raises(SocketError, match=r"inputs\.json: missing"):
        read_inputs(job["dir"])
    inputs = read_inputs(job["dir"], known=(REPORT, CT))
    assert inputs.text("radiology-report") == job["report"]  # read from the socket's file
    np.testing.assert_array_equal(inputs.image("ct-image").array, job["ct"])
    with pytest.raises(SocketError, match="no inputs.json; known sockets assumed.*'patient-age'"):
        inputs.json("patient-age")
