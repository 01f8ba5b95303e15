"""Ingest under the faults of issue 20, on real files made here: a disk that fills up while ingest writes
(spills or shards), symlinked and unreadable source folders, a PNG past Pillow's bomb limit, mask folders,
a video shorter than its header says, and native decoder messages on stderr."""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from usjepa.ingest import pipeline
from usjepa.ingest.cli import EXIT_FAILED, EXIT_OK, EXIT_SKIPPED, main
from usjepa.ingest.readers import SourceUnreadable, open_frames
from usjepa.ingest.sources import DatasetSpec, list_sources
from usjepa.shards import format as shard_format
from usjepa.shards.format import iter_tar_samples, load_manifest, sample_key


def _scan(h: int, w: int, seed: int) -> np.ndarray:
    """A frame with a textured scan area inside a black border (what the USrc mask expects)."""
    rng = np.random.default_rng(seed)
    f = np.zeros((h, w), np.uint8)
    f[h // 10 : h - h // 10, w // 8 : w - w // 8] = rng.integers(30, 255, (h - 2 * (h // 10), w - 2 * (w // 8)))
    return f


def _make_corpus(root: Path) -> Path:
    for i in range(6):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"still_{i}.png"), _scan(120, 160, i))
    vw = cv2.VideoWriter(str(root / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (160, 120))
    for k in range(8):
        vw.write(cv2.cvtColor(_scan(120, 160, 100 + k), cv2.COLOR_GRAY2BGR))
    vw.release()
    return root


def _corpus_content(out: Path) -> tuple[list[str], dict[str, str]]:
    """Sorted sample keys and {shard: sha256} of a finished corpus."""
    m = load_manifest(out)
    keys = sorted(k for s in m["shards"] for k, _ in iter_tar_samples(Path(s["abs_path"])))
    return keys, {s["path"]: s["sha256"] for s in m["shards"]}


class _DiskFull:
    """Every file that ingest (pipeline.py) or ShardWriter (format.py) opens for writing shares ``budget``
    bytes; the write that crosses it writes what fits and fails with ENOSPC, as a full disk does."""

    def __init__(self, budget: int):
        self.left = budget

    def open(self, file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        return _FillingFile(f, self) if any(c in mode for c in "wax+") else f


class _FillingFile:
    def __init__(self, f, disk: _DiskFull):
        self._f, self._disk = f, disk

    def write(self, b):
        n = len(memoryview(b).cast("B")) if not isinstance(b, str) else len(b.encode())
        if n > self._disk.left:
            self._f.write(b[: self._disk.left])
            self._disk.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.left -= n
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("phase", ["spills", "shards"])
def test_disk_full_stops_with_one_line_and_the_resume_ends_with_every_frame(tmp_path, monkeypatch, capsys, phase):
    src = _make_corpus(tmp_path / "src")
    args = ["--workers", "1", "--quiet", "--shard-size", "40KB"]
    clean = tmp_path / "clean"
    assert main(["run", str(src), "--out", str(clean), *args]) == EXIT_OK
    keys, shards = _corpus_content(clean)
    payload = sum(s["bytes"] for s in load_manifest(clean)["shards"])
    capsys.readouterr()

    # phase 1 writes about `payload` bytes of spills, phase 2 as much again in shards
    disk = _DiskFull(payload // 3 if phase == "spills" else payload * 4 // 3)
    monkeypatch.setattr(pipeline, "open", disk.open, raising=False)
    monkeypatch.setattr(shard_format, "open", disk.open, raising=False)
    out = tmp_path / "out"
    assert main(["run", str(src), "--out", str(out), *args]) == EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "No space left on device (ENOSPC)" in err[0], err
    assert not (out / "manifest.json").exists()
    tasks = out / ".ingest-work" / "part-0-of-1" / "tasks"
    done = [p for p in tasks.iterdir() if ".tmp." not in p.name]
    assert len(done) == (2 if phase == "shards" else 0)  # 2 tasks: the stills, the clip

    monkeypatch.undo()  # space freed: the same command resumes
    assert main(["run", str(src), "--out", str(out), *args]) == EXIT_OK
    m = load_manifest(out)
    assert m["skipped"] == [] and m["summary"]["frames"] == len(keys)
    assert _corpus_content(out) == (keys, shards)  # exactly the frames (and bytes) of the uninterrupted run


def _run_cli_as_nobody(argv: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    """``usjepa-ingest`` in a real process whose file permissions apply: as root (where chmod 000 does not
    stop a read), it imports what it needs and then drops to user nobody."""
    code = ("import os, sys, secrets, tempfile, tqdm, webdataset, cv2, PIL.Image, PIL.PngImagePlugin\n"
            "import usjepa.ingest.cli, usjepa.ingest.pipeline\n"
            "if os.geteuid() == 0:\n"
            "    os.setgid(65534); os.setuid(65534)\n"
            f"sys.exit(usjepa.ingest.cli.main({argv!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def shared_tmp():
    """A folder user nobody can enter (pytest's tmp_path lies under a 0700 folder when run as root)."""
    d = Path(tempfile.mkdtemp(prefix="usjepa-faults-"))
    d.chmod(0o755)
    yield d
    for p in [d, *d.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o777 if p.is_dir() else 0o666)
    shutil.rmtree(d)


def test_symlinked_folders_are_followed_once_and_unreadable_ones_reported(shared_tmp):
    src, ext, out = shared_tmp / "src", shared_tmp / "elsewhere", shared_tmp / "out"
    for rel in ("a/x.png", "locked/z.png", "secret.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(src / rel), _scan(120, 160, len(rel)))
    ext.mkdir()
    cv2.imwrite(str(ext / "y.png"), _scan(120, 160, 7))
    (src / "linked").symlink_to(ext)  # a folder kept elsewhere: followed
    (src / "linked_again").symlink_to(ext)  # the same folder a second time: listed once
    (src / "a" / "up").symlink_to("..")  # a loop: not followed
    (src / "locked").chmod(0)
    (src / "secret.png").chmod(0)
    out.mkdir()
    out.chmod(0o777)
    done = _run_cli_as_nobody(["run", str(src), "--out", str(out), "--workers", "1", "--quiet"])
    assert done.returncode == EXIT_SKIPPED, done.stderr
    m = load_manifest(out)
    assert sorted(k for s in m["shards"] for k, _ in iter_tar_samples(Path(s["abs_path"]))) == sorted(
        sample_key("src", rel, 0) for rel in ("a/x.png", "linked/y.png"))
    assert {s["path"]: s["reason"] for s in m["skipped"]} == {
        "locked/": "folder not readable: Permission denied", "secret.png": "cannot open: Permission denied"}
    assert {i["path"] for i in m["ignored"]} == {"a/up/", "linked_again/"}
    assert "skipped src/locked/: folder not readable" in done.stderr


def _binary(h: int, w: int, seed: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.circle(m, (w // 2 + seed, h // 2), h // 4, 255, -1)
    return m


def test_mask_folders_are_left_out_and_counted(tmp_path):
    root = tmp_path / "thyroid"
    for d in ("images", "labels", "Masks"):
        (root / d).mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(root / "images" / f"case_{i}.png"), _scan(120, 160, i))
        cv2.imwrite(str(root / "labels" / f"case_{i}.png"), _binary(120, 160, i))  # paired binary: masks
        cv2.imwrite(str(root / "Masks" / f"other_{i}.png"), _binary(120, 160, i))  # named like masks
    out = tmp_path / "out"
    assert main(["run", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == EXIT_OK
    m = load_manifest(out)
    assert m["summary"]["frames"] == 4 and m["datasets"]["thyroid"]["excluded_files"] == 8
    assert {(f["path"], f["files"]) for f in m["excluded_folders"]} == {("Masks/", 4), ("labels/", 4)}
    kept = tmp_path / "kept"
    assert main(["run", str(root), "--out", str(kept), "--workers", "1", "--quiet", "--exclude", ""]) == EXIT_OK
    assert load_manifest(kept)["summary"]["frames"] == 12  # --exclude '' keeps them


DDTI = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "ddti"


@pytest.mark.skipif(not (DDTI / "mask").is_dir(), reason="../shared/realdata/ddti not present")
def test_ddti_mask_gifs_are_not_listed_as_frames():
    listing = list_sources([DatasetSpec("ddti", DDTI)])
    n_masks = sum(1 for p in (DDTI / "mask").iterdir() if p.suffix == ".gif")
    assert n_masks and not [s.rel for s in listing.sources if s.rel.startswith("mask/")]
    assert listing.excluded["ddti"] == n_masks
    assert [(f["path"], f["files"]) for f in listing.excluded_folders] == [("mask/", n_masks)]


def _huge_png(path: Path, side: int = 20000) -> Path:
    """A valid side x side 1-bit PNG (50 MB of pixels compressed to ~50 kB): past Pillow's bomb limit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then black pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_pixel_budget_holds_past_pillows_bomb_limit(tmp_path):
    root = tmp_path / "stills"
    root.mkdir()
    big = _huge_png(root / "huge.png")
    with pytest.raises(SourceUnreadable, match=r"20000x20000 image \(400 Mpx\) exceeds the pixel budget.*\(PNG\)"):
        list(open_frames(big))  # refused from the header: never decoded (400 MB)
    cv2.imwrite(str(root / "small.png"), _scan(120, 160, 1))
    out = tmp_path / "out"
    assert main(["run", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == EXIT_SKIPPED
    m = load_manifest(out)
    assert [s["path"] for s in m["skipped"]] == ["huge.png"] and "pixel budget" in m["skipped"][0]["reason"]
    assert m["summary"]["frames"] == 1


def _avi(path: Path, n: int, seed: int = 0) -> Path:
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (160, 120))
    for k in range(n):
        vw.write(cv2.cvtColor(_scan(120, 160, seed + k), cv2.COLOR_GRAY2BGR))
    vw.release()
    return path


def test_video_shorter_than_its_header_keeps_every_decoded_frame(tmp_path):
    root = tmp_path / "clips"
    root.mkdir()
    # header over-estimates the count (as a variable-frame-rate file's does): 20 frames, header says 26
    data = bytearray(_avi(tmp_path / "whole.avi", 20).read_bytes())
    for tag, field in ((b"avih", 16), (b"strh", 32)):  # avih dwTotalFrames, strh dwLength
        at = data.find(tag) + 8 + field
        assert int.from_bytes(data[at : at + 4], "little") == 20
        data[at : at + 4] = (26).to_bytes(4, "little")
    (root / "vfr_like.avi").write_bytes(bytes(data))
    # cut at a frame boundary: the whole frames before it decode cleanly, the header still says 20
    data = _avi(tmp_path / "other.avi", 20, seed=50).read_bytes()
    frames_at = [i for i in range(data.find(b"movi"), data.find(b"idx1")) if data[i : i + 4] == b"00dc"]
    (root / "cut.avi").write_bytes(data[: frames_at[15]])

    stream = open_frames(root / "vfr_like.avi")
    assert len(list(stream)) == 20 and (stream.header_frames, stream.header_shortfall) == (26, 6)
    n_cut = len(list(open_frames(root / "cut.avi")))
    assert 10 <= n_cut < 20
    out = tmp_path / "out"
    assert main(["run", str(root), "--out", str(out), "--workers", "1", "--quiet"]) == EXIT_OK
    m = load_manifest(out)
    assert m["skipped"] == [] and m["summary"]["frames"] == 20 + n_cut
    assert m["short_of_header"] == [
        {"dataset": "clips", "path": "cut.avi", "decoded": n_cut, "header_frames": 20},
        {"dataset": "clips", "path": "vfr_like.avi", "decoded": 20, "header_frames": 26}]


def test_codec_messages_stay_off_stderr(tmp_path):
    """FFmpeg and libjpeg write to file descriptor 2 themselves: only a real process shows what leaks."""
    root = tmp_path / "src"
    root.mkdir()
    cv2.imwrite(str(root / "ok.jpg"), _scan(120, 160, 0))
    jpg = (root / "ok.jpg").read_bytes()
    (root / "extra_bytes.jpg").write_bytes(jpg[:-2] + b"\0\0junk\xff\xd9")  # libjpeg: "Corrupt JPEG data"
    damaged = bytearray(_avi(tmp_path / "clip.avi", 20).read_bytes())
    for i in range(len(damaged) // 3, len(damaged) // 3 + 400):  # FFmpeg: "[mjpeg @ ...] error y=.. x=.."
        damaged[i] = (damaged[i] * 7 + 13) & 255
    (root / "damaged.avi").write_bytes(bytes(damaged))
    (root / "cut.mp4").write_bytes(b"\0\0\0\x18ftypisom" + bytes(200))  # FFmpeg: "moov atom not found"
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "usjepa.ingest.cli", "run", str(root), "--out", str(out),
                           "--workers", "1", "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_SKIPPED, done.stderr
    skipped = load_manifest(out)["skipped"]
    assert [s["path"] for s in skipped] == ["cut.mp4"]
    assert done.stderr.splitlines() == [f"  skipped src/{s['path']}: {s['reason']}" for s in skipped]
    assert "moov atom not found" in {s["path"]: s["reason"] for s in skipped}["cut.mp4"]  # kept in the reason


def test_verify_and_contact_sheet_report_progress_in_a_log(tmp_path, capsys):
    src = _make_corpus(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["run", str(src), "--out", str(out), "--workers", "1", "--quiet", "--shard-size", "4KB"]) == EXIT_OK
    n_shards = len(load_manifest(out)["shards"])
    assert n_shards >= 10
    capsys.readouterr()
    assert main(["verify", str(out)]) == EXIT_OK
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("verify: ")]
    assert 5 <= len(lines) <= 10 and lines[-1].startswith(f"verify: {n_shards}/{n_shards} shards (")
    assert main(["contact-sheet", str(out), "--out", str(tmp_path / "sheet.png"), "--sort", "coverage"]) == EXIT_OK
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].startswith("contact-sheet: 14/14 frames read (")


def test_pixel_budget_holds_for_videos_and_volumes(tmp_path):
    import nibabel as nib
    import nrrd
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    vol = np.stack([_scan(48, 64, k) for k in range(3)])  # [z, y, x]
    files = [_avi(tmp_path / "clip.avi", 4)]
    nib.save(nib.Nifti1Image(np.moveaxis(vol, 0, -1).copy(), np.eye(4)), str(tmp_path / "v.nii.gz"))
    nrrd.write(str(tmp_path / "v.nrrd"), vol, index_order="C")
    (tmp_path / "v.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 64 48 3\nElementType = MET_UCHAR\n"
                                     b"ElementDataFile = LOCAL\n" + vol.tobytes())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.3.1", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.NumberOfFrames = 48, 64, 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = vol.tobytes()
    ds.save_as(str(tmp_path / "cine.dcm"), enforce_file_format=True)
    files += [tmp_path / n for n in ("v.nii.gz", "v.nrrd", "v.mha", "cine.dcm")]
    for path in files:
        assert len(list(open_frames(path))) >= 3  # within the default budget: read in full
        with pytest.raises(SourceUnreadable, match=r"\d+x\d+ (frames|slices) .* exceed the pixel budget"):
            list(open_frames(path, max_pixels=1000))
