"""Readers and source listing of usjepa-ingest: every format on real files made here, bad files."""

from __future__ import annotations

import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from usjepa.ingest.readers import SourceUnreadable, kind_of, open_frames, read_metaimage
from usjepa.ingest.sources import DatasetSpec, list_sources, parse_part, part_of


def _frames(n: int, h: int = 48, w: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (h, w), dtype=np.uint8) for _ in range(n)]


def _read_all(path, stride=1):
    stream = open_frames(path, stride)
    return stream, list(stream)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"])
def test_still_formats(tmp_path, ext):
    img = cv2.cvtColor(_frames(1)[0], cv2.COLOR_GRAY2BGR)
    p = tmp_path / f"a b.(c){ext}"  # spaces, dots and parentheses in the name
    assert cv2.imwrite(str(p), img)
    stream, frames = _read_all(p)
    assert [i for i, _ in frames] == [0] and frames[0][1].shape[:2] == (48, 64)
    assert stream.decoded == 1 and stream.duplicates == 0


def test_16bit_tiff_is_read(tmp_path):
    img = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 20)
    cv2.imwrite(str(tmp_path / "x.tif"), img)
    (_, f), = list(open_frames(tmp_path / "x.tif"))
    assert f.dtype == np.uint16 and f.max() == img.max()


def _write_avi(path: Path, frames: list[np.ndarray]) -> None:
    h, w = frames[0].shape
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
    assert vw.isOpened()
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_GRAY2BGR))
    vw.release()


def test_video_drops_exact_duplicates_and_strides(tmp_path):
    f = _frames(6)
    seq = [f[0], f[0], f[1], f[2], f[2], f[2], f[3], f[4], f[5], f[5]]  # 4 consecutive repeats
    _write_avi(tmp_path / "clip.avi", seq)
    stream, frames = _read_all(tmp_path / "clip.avi")
    assert stream.decoded == 10 and stream.duplicates == 4 and len(frames) == 6
    assert [i for i, _ in frames] == [0, 2, 3, 6, 7, 8]  # indices are positions in the file
    stream, frames = _read_all(tmp_path / "clip.avi", stride=3)
    assert [i for i, _ in frames] == [0, 3, 6, 9] and stream.strided == 6
    assert stream.duplicates == 0  # frame 9 duplicates 8, but 8 was not kept


def test_gif_frames(tmp_path):
    f = [cv2.cvtColor(x, cv2.COLOR_GRAY2BGR) for x in _frames(3)]
    p = tmp_path / "anim.gif"
    anim = cv2.Animation()
    anim.frames, anim.durations = f, [100] * 3
    if not cv2.imwriteanimation(str(p), anim):
        pytest.skip("this OpenCV cannot write GIF")
    stream, frames = _read_all(p)
    assert len(frames) == 3 and frames[0][1].shape[:2] == (48, 64)


def test_nifti_and_nrrd_volumes(tmp_path):
    import nibabel as nib
    import nrrd

    vol = np.stack(_frames(5), axis=-1).astype(np.int16) * 10 - 300  # [H, W, D], signed, beyond uint8
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii.gz"))
    stream, frames = _read_all(tmp_path / "v.nii.gz")
    assert len(frames) == 5 and frames[0][1].shape == (48, 64) and frames[0][1].dtype == np.uint8
    # one intensity mapping for the whole volume: the global min/max land on 0/255
    stacked = np.stack([f for _, f in frames])
    assert stacked.min() == 0 and stacked.max() == 255
    nrrd.write(str(tmp_path / "v.nrrd"), np.stack(_frames(4)), index_order="C")
    _, frames = _read_all(tmp_path / "v.nrrd")
    assert len(frames) == 4 and frames[0][1].shape == (48, 64)


def _mha_header(dims, etype, extra="", data="LOCAL"):
    return (f"ObjectType = Image\nNDims = {len(dims)}\nDimSize = {' '.join(map(str, dims))}\n"
            f"ElementType = {etype}\n{extra}ElementDataFile = {data}\n").encode()


def test_metaimage_mha_mhd_and_compressed(tmp_path):
    vol = np.stack(_frames(3)).astype(np.uint16) * 7  # [z, y, x]
    (tmp_path / "a.mha").write_bytes(_mha_header((64, 48, 3), "MET_USHORT") + vol.astype("<u2").tobytes())
    (tmp_path / "b.mha").write_bytes(_mha_header((64, 48, 3), "MET_USHORT", "CompressedData = True\n")
                                     + zlib.compress(vol.astype("<u2").tobytes()))
    (tmp_path / "c.raw").write_bytes(vol.astype(">u2").tobytes())
    (tmp_path / "c.mhd").write_bytes(_mha_header((64, 48, 3), "MET_USHORT", "BinaryDataByteOrderMSB = True\n", "c.raw"))
    for name in ("a.mha", "b.mha", "c.mhd"):
        np.testing.assert_array_equal(read_metaimage(tmp_path / name), vol)
        _, frames = _read_all(tmp_path / name)
        assert len(frames) == 3 and frames[0][1].shape == (48, 64)
    (tmp_path / "d.mha").write_bytes(_mha_header((64, 48, 3), "MET_USHORT") + b"\0" * 100)
    with pytest.raises(SourceUnreadable, match="truncated"):
        list(open_frames(tmp_path / "d.mha"))
    (tmp_path / "e.mhd").write_bytes(_mha_header((4, 4), "MET_UCHAR", data="../outside.raw"))
    with pytest.raises(SourceUnreadable, match="outside"):
        list(open_frames(tmp_path / "e.mhd"))


def test_dicom_multiframe_cine(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    cine = np.stack(_frames(4))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # ultrasound multi-frame image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 48, 64, 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = cine.tobytes()
    ds.save_as(str(tmp_path / "cine.dcm"), enforce_file_format=True)
    _, frames = _read_all(tmp_path / "cine.dcm")
    assert len(frames) == 4
    np.testing.assert_array_equal(frames[2][1], cine[2])


def test_bad_files_raise_with_reasons(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "link.png").symlink_to(tmp_path / "missing.png")
    _write_avi(tmp_path / "good.avi", _frames(8))
    raw = (tmp_path / "good.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(raw[:300])
    (tmp_path / "junk.mp4").write_bytes(b"\0\0\0\x18ftypmp42" + b"\x17" * 500)
    expected = {"empty.png": "0 bytes", "text.jpg": "not a decodable JPG", "dir.png": "not a regular file",
                "link.png": "broken symbolic link", "cut.avi": "video", "junk.mp4": "video"}
    for name, reason in expected.items():
        with pytest.raises(SourceUnreadable, match=reason) as e:
            list(open_frames(tmp_path / name))
        assert e.value.reason
    with pytest.raises(SourceUnreadable, match="unsupported"):
        open_frames(tmp_path / "notes.txt")


def test_kinds():
    assert kind_of("a/B.NII.GZ") == "volume" and kind_of("x.MPG") == "video" and kind_of("y.TIFF") == "still"
    assert kind_of("README.md") is None


def test_listing_groups_labels_exclude_and_parts(tmp_path):
    root = tmp_path / "ds"
    for cls in ("benign", "malignant"):
        (root / cls).mkdir(parents=True)
        for p in range(3):
            for view in range(2):
                (root / cls / f"{cls}_p{p}_{view}.png").write_bytes(b"x")
                (root / cls / f"{cls}_p{p}_{view}_mask.png").write_bytes(b"x")
    (root / "notes.csv").write_text("a,b\n")
    (root / ".hidden.png").write_bytes(b"x")
    spec = DatasetSpec("busi like", root, group_pattern=r"_(p\d+)_")
    listing = list_sources([spec])
    assert len(listing.sources) == 12 and listing.excluded["busi like"] == 12
    assert [i["path"] for i in listing.ignored] == ["notes.csv"]
    assert {s.label for s in listing.sources} == {"benign", "malignant"}
    groups = {s.group for s in listing.sources}
    assert groups == {"busi_like:p0", "busi_like:p1", "busi_like:p2"}  # patient groups across classes
    assert listing.sources == list_sources([spec]).sources  # stable order
    parts = [[s for s in listing.sources if part_of(s, 3) == i] for i in range(3)]
    assert sorted(s.uid for p in parts for s in p) == sorted(s.uid for s in listing.sources)
    assert parse_part("1/3") == (1, 3) and parse_part(None) == (0, 1)
    for bad in ("3/3", "1", "a/b", "0/0"):
        with pytest.raises(ValueError):
            parse_part(bad)


def test_dataset_lists_yaml_json_and_folders(tmp_path):
    import json

    import yaml

    from usjepa.ingest.sources import datasets_from_args, load_dataset_list

    for d in ("a/x", "b"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "a" / "x" / "s_p1_0.png").write_bytes(b"x")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump({"datasets": [
        {"name": "A", "root": "a", "anatomy": "lung", "kind": "video", "labels": "none", "group_pattern": "_(p\\d+)_"},
        {"name": "B", "root": str(tmp_path / "b")}]}))
    specs = load_dataset_list(tmp_path / "list.yaml")
    assert [s.name for s in specs] == ["A", "B"] and specs[0].root == (tmp_path / "a").resolve()
    (src,) = list_sources(specs).sources
    assert src.label is None and src.group == "A:p1" and src.rel == "x/s_p1_0.png"
    (tmp_path / "list.json").write_text(json.dumps([{"name": "A", "root": "a"}]))
    assert list_sources(load_dataset_list(tmp_path / "list.json")).sources[0].label == "x"
    assert [s.name for s in datasets_from_args([str(tmp_path / "a"), str(tmp_path / "b")])] == ["a", "b"]
    (tmp_path / "other" / "B").mkdir(parents=True)
    with pytest.raises(ValueError, match="unique"):  # list's "B" and the folder .../B
        datasets_from_args([str(tmp_path / "list.yaml"), str(tmp_path / "other" / "B")])
    with pytest.raises(FileNotFoundError):
        datasets_from_args([str(tmp_path / "nope")])
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"datasets": [{"name": "A"}]}))
    with pytest.raises(ValueError, match="root"):
        load_dataset_list(tmp_path / "bad.yaml")
