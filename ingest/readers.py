"""Frame readers for the raw formats ``usjepa-ingest`` accepts, one per kind of file.

``open_frames(path, stride)`` returns a ``FrameStream``: iterating it yields ``(frame_index, frame)`` with
``frame`` a uint8 (or, for volumes, any numeric) array [H,W] or [H,W,3] BGR, and ``frame_index`` the frame's
position in the file (so a sample's key names the same frame whatever the stride). The stream keeps counts:
``decoded`` (frames read from the file), ``strided`` (left out by the stride) and ``duplicates`` (a frame
byte-identical to the previously kept one: frozen video, repeated GIF frames — dropped).

A file that cannot be read raises ``SourceUnreadable`` with a one-line reason, which the pipeline writes
into the manifest; it never aborts a run.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

STILL_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mpeg", ".mpg", ".mov", ".gif")
VOLUME_EXTS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".dicom")


class SourceUnreadable(ValueError):
    """A source file that yields no frame (empty, truncated, undecodable, unsupported, unreadable)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def file_ext(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def kind_of(path: str | os.PathLike) -> str | None:
    """'still', 'video', 'volume', or None for a file ingest does not read."""
    ext = file_ext(path)
    if ext in STILL_EXTS:
        return "still"
    if ext in VIDEO_EXTS:
        return "video"
    if ext in VOLUME_EXTS:
        return "volume"
    return None


def check_readable(path: Path) -> None:
    """Clear reasons for the cases every format shares: broken link, not a file, no permission, 0 bytes."""
    if path.is_symlink() and not path.exists():
        raise SourceUnreadable("broken symbolic link")
    if not path.exists():
        raise SourceUnreadable("file vanished")
    if not path.is_file():
        raise SourceUnreadable("not a regular file (a directory or device with an image extension)")
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError as e:
        raise SourceUnreadable(f"cannot open: {e.strerror or e}") from e
    if not head:
        raise SourceUnreadable("empty file (0 bytes)")


class FrameStream:
    """Frames of one file with stride and exact-duplicate dropping; see the module docstring."""

    def __init__(self, path: str | os.PathLike, stride: int = 1):
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.path = Path(path)
        self.kind = kind_of(self.path)
        if self.kind is None:
            raise SourceUnreadable(f"unsupported file type {file_ext(self.path)!r}")
        check_readable(self.path)
        self.stride = stride
        self.decoded = 0
        self.strided = 0
        self.duplicates = 0

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        if self.kind == "video":
            raw = _read_video(self.path, self.stride)
        else:
            raw = {"still": _read_still, "volume": _read_volume}[self.kind](self.path)
        previous = None
        for index, frame in raw:
            self.decoded += 1
            if index % self.stride:
                self.strided += 1
                continue
            if previous is not None and frame.shape == previous.shape and np.array_equal(frame, previous):
                self.duplicates += 1
                continue
            previous = frame
            yield index, frame
        if self.decoded == 0:
            raise SourceUnreadable(f"no decodable frame in this {self.kind} file")


def open_frames(path: str | os.PathLike, stride: int = 1) -> FrameStream:
    return FrameStream(path, stride)


# ------------------------------------------------------------------------------------------- stills


def _read_still(path: Path) -> Iterator[tuple[int, np.ndarray]]:
    # imdecode on bytes rather than imread(path): no surprises with unusual characters in names
    data = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if img is None:
        raise SourceUnreadable(f"not a decodable {file_ext(path)[1:].upper()} image (corrupt or another format)")
    if img.ndim == 3 and img.shape[2] == 2:  # gray + alpha PNG: the alpha is no image content
        img = img[:, :, 0]
    yield 0, img


# ------------------------------------------------------------------------------------------- videos


def _read_video(path: Path, stride: int = 1) -> Iterator[tuple[int, np.ndarray | None]]:
    """Frames in file order; frames the stride leaves out are only grabbed (no colour conversion) and
    yielded as None, so that they are still counted."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise SourceUnreadable("OpenCV cannot open this video (truncated, corrupt or unknown codec)")
        index = 0
        while True:
            if index % stride:
                if not cap.grab():
                    break
                yield index, None
            else:
                ok, frame = cap.read()
                if not ok:
                    break
                yield index, frame
            index += 1
    finally:
        cap.release()


# ------------------------------------------------------------------------------------------ volumes


def _to_uint8_volume(vol: np.ndarray) -> np.ndarray:
    """One intensity mapping for the whole volume (not per slice), so slices stay comparable."""
    if vol.dtype == np.uint8:
        return vol
    v = vol.astype(np.float32)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        raise SourceUnreadable("volume holds no finite values")
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(v.shape, np.uint8)
    return np.clip(np.rint((np.nan_to_num(v, nan=lo) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _slices(vol: np.ndarray, axis: int) -> Iterator[tuple[int, np.ndarray]]:
    vol = _to_uint8_volume(np.moveaxis(vol, axis, 0))
    for i in range(vol.shape[0]):
        yield i, np.ascontiguousarray(vol[i])


def _read_volume(path: Path) -> Iterator[tuple[int, np.ndarray]]:
    ext = file_ext(path)
    try:
        if ext in (".nii", ".nii.gz"):
            vol = _load_nifti(path)
            # NIfTI: frames are slices along the last spatial axis; a 4-D series (x, y, z, t) is flattened
            vol = vol.reshape(vol.shape[0], vol.shape[1], -1) if vol.ndim > 3 else vol
            axis = 2 if vol.ndim == 3 else None
        elif ext in (".nrrd", ".nhdr"):
            import nrrd

            vol, _ = nrrd.read(str(path), index_order="C")  # C order: [slowest, ..., fastest=x]
            axis = 0 if vol.ndim == 3 else None
        elif ext in (".mha", ".mhd"):
            vol = read_metaimage(path)
            axis = 0 if vol.ndim == 3 else None
        else:
            yield from _read_dicom(path)
            return
    except SourceUnreadable:
        raise
    except Exception as e:  # the libraries raise many types for corrupt files; report, never abort
        raise SourceUnreadable(f"cannot read {ext} volume: {type(e).__name__}: {e}") from e
    if vol.ndim == 2:
        yield 0, _to_uint8_volume(vol)
    elif axis is None:
        raise SourceUnreadable(f"unsupported volume shape {vol.shape}")
    else:
        yield from _slices(vol, axis)


def _load_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    img = nib.load(str(path))
    if img.get_data_dtype().names:  # RGB NIfTI (structured dtype)
        raise SourceUnreadable("RGB NIfTI volumes are not supported")
    return np.asanyarray(img.dataobj)


def _read_dicom(path: Path) -> Iterator[tuple[int, np.ndarray]]:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array  # needs a pixel-data handler for compressed transfer syntaxes
    except Exception as e:
        raise SourceUnreadable(f"cannot decode DICOM pixel data: {type(e).__name__}: {e}") from e
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    colour = int(getattr(ds, "SamplesPerPixel", 1)) == 3
    if frames == 1:
        arr = arr[None]
    if colour:
        arr = arr[..., ::-1]  # pydicom gives RGB (converting YBR); our frames are BGR like OpenCV's
    arr = _to_uint8_volume(arr)
    for i in range(arr.shape[0]):
        yield i, np.ascontiguousarray(arr[i])


# ------------------------------------------------------------------------------- MetaImage (.mha/.mhd)

_MET_TYPES = {
    "MET_UCHAR": np.uint8, "MET_CHAR": np.int8, "MET_USHORT": np.uint16, "MET_SHORT": np.int16,
    "MET_UINT": np.uint32, "MET_INT": np.int32, "MET_ULONG": np.uint64, "MET_LONG": np.int64,
    "MET_FLOAT": np.float32, "MET_DOUBLE": np.float64,
}


def read_metaimage(path: str | os.PathLike) -> np.ndarray:
    """Read an ITK MetaImage (.mha with data inline, or .mhd + raw file) into a C-order array
    [z, y, x] (or [y, x]). SimpleITK is not a dependency; the format is a text header and raw bytes.
    Only single-component images; zlib-compressed data is supported."""
    path = Path(path)
    header: dict[str, str] = {}
    with open(path, "rb") as f:
        while True:
            line = f.readline()
            if not line:
                raise SourceUnreadable("MetaImage header ends without ElementDataFile")
            text = line.decode("latin-1").strip()
            if not text:
                continue
            if "=" not in text:
                raise SourceUnreadable(f"not a MetaImage header line: {text[:40]!r}")
            k, v = (s.strip() for s in text.split("=", 1))
            header[k] = v
            if k == "ElementDataFile":  # always the last header field
                break
        inline = f.read()
    dims = [int(x) for x in header.get("DimSize", "").split()]
    etype = _MET_TYPES.get(header.get("ElementType", ""))
    if not dims or etype is None:
        raise SourceUnreadable(f"MetaImage without DimSize or with unsupported ElementType {header.get('ElementType')!r}")
    if int(header.get("ElementNumberOfChannels", "1")) != 1:
        raise SourceUnreadable("multi-channel MetaImage is not supported")
    src = header["ElementDataFile"]
    if src == "LOCAL":
        raw = inline
    else:
        data_path = (path.parent / src).resolve()
        if path.parent.resolve() not in data_path.parents:
            raise SourceUnreadable(f"MetaImage data file {src!r} lies outside the header's folder")
        raw = data_path.read_bytes()
    if header.get("CompressedData", "False").lower() == "true":
        raw = zlib.decompress(raw)
    msb = (header.get("BinaryDataByteOrderMSB") or header.get("ElementByteOrderMSB") or "False").lower() == "true"
    dtype = np.dtype(etype).newbyteorder(">" if msb else "<")
    n = int(np.prod(dims))
    if len(raw) < n * dtype.itemsize:
        raise SourceUnreadable(f"MetaImage data truncated: {len(raw)} bytes for {n} elements of {dtype.itemsize}")
    return np.frombuffer(raw, dtype, count=n).reshape(dims[::-1]).astype(dtype.newbyteorder("="))
