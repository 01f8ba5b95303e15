"""Frame readers for the raw formats ``usjepa-ingest`` accepts, one per kind of file.

``open_frames(path, stride)`` returns a ``FrameStream``: iterating it yields ``(frame_index, frame)`` with
``frame`` a uint8 (or, for volumes, any numeric) array [H,W] or [H,W,3] BGR, and ``frame_index`` the frame's
position in the file (so a sample's key names the same frame whatever the stride). The stream keeps counts:
``decoded`` (frames read from the file), ``strided`` (left out by the stride) and ``duplicates`` (a frame
byte-identical to the previously kept one: frozen video, repeated GIF frames — dropped).

A file that cannot be read raises ``SourceUnreadable`` with a one-line reason, which the pipeline writes
into the manifest; it never aborts a run. That includes **truncated videos**, checked per container
(OpenCV's decoder stops quietly at a cut, so a half-file would otherwise pass as a short clip):

* ``.avi``, ``.mp4``, ``.mov``: an mp4/mov cut before its moov does not open at all. Fewer frames decoded
  than the header declares is *not* a reason to skip: the header count is an estimate for variable-frame-
  rate files (a .mov declaring 210 frames that decodes 192 clean ones), so every frame that decodes is
  kept and the shortfall is reported (``FrameStream.header_shortfall``, the manifest's ``short_of_header``);
* ``.mpeg``/``.mpg`` program streams: the pack/packet structure is walked and must end exactly at the end
  of the file (a cut leaves a packet whose declared length runs past it); OpenCV's frame count for these
  is an estimate from the file size, useless for the check;
* ``.gif``: the file must end with the GIF trailer byte (0x3B);
* every container: a stream whose last frames (``_TAIL_FRAMES``) make the decoder report an error (FFmpeg
  writes "ac-tex damaged", "Error at MB", ... to stderr; that is the only report OpenCV passes on) ends in
  a decode error — what an MPEG cut at a pack boundary, which the structure check cannot see, looks like.

The whole file is skipped (``skipped`` in the manifest, with the reason), never kept up to the cut: a
clip that ends in garbage is not worth the frames before it, and a rerun after fixing the file picks it up.

**Pixel budget**: a still of more than ``max_pixels`` pixels (size read from its header, before decoding)
is decoded reduced by 2, 4 or 8 when it is a JPEG (``cv2.IMREAD_REDUCED_COLOR_*``, which libjpeg scales
while decoding), and skipped otherwise (OpenCV decodes other formats whole before reducing them). A video
or volume whose frames (slices) exceed the budget is skipped from its header too.
"""

from __future__ import annotations

import contextlib
import os
import sys
import zlib
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

STILL_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mpeg", ".mpg", ".mov", ".gif")
VOLUME_EXTS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".dicom")
DEFAULT_MAX_PIXELS = 64_000_000
_HEADER_COUNTED = (".avi", ".mp4", ".mov")
_TAIL_FRAMES = 3  # a decoder error this close to the end of a stream means the stream was cut  # containers whose header declares the exact frame count
_REDUCED = ((2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8))


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

    def __init__(self, path: str | os.PathLike, stride: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS):
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.path = Path(path)
        self.kind = kind_of(self.path)
        if self.kind is None:
            raise SourceUnreadable(f"unsupported file type {file_ext(self.path)!r}")
        check_readable(self.path)
        self.stride = stride
        self.max_pixels = max_pixels
        self.decoded = 0
        self.strided = 0
        self.duplicates = 0
        self.header_frames: int | None = None  # a video's frame count as its container header declares it

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        if self.kind == "video":
            raw = _read_video(self.path, self.stride, self)
        elif self.kind == "still":
            raw = _read_still(self.path, self.max_pixels)
        else:
            raw = _read_volume(self.path, self.max_pixels)
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


    @property
    def header_shortfall(self) -> int:
        """Frames the container header declares beyond those decoded; 0 within a few frames of slack (edit
        lists and B-frame reordering move OpenCV's count by one or two). Headers of variable-frame-rate
        files only estimate the count, so a shortfall is reported, never a reason to drop decoded frames."""
        if self.header_frames is None or self.decoded >= 0.98 * self.header_frames - 1:
            return 0
        return self.header_frames - self.decoded


def open_frames(path: str | os.PathLike, stride: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> FrameStream:
    return FrameStream(path, stride, max_pixels)


# ------------------------------------------------------------------------------------------- stills


def _image_header(path: Path) -> tuple[int, int, str] | None:
    """(width, height, format) from the file header without decoding pixels; None if Pillow cannot tell."""
    from PIL import Image

    # Pillow refuses to open an image past its own bomb limit (~179 Mpx) and says so by raising; then the
    # size would be unknown here and OpenCV would decode it whole. Only the header is read, so lift the
    # limit for the open; the caller applies the project's budget (max_pixels) to the size read.
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as im:
            return im.size[0], im.size[1], str(im.format)
    except Exception:  # not an image Pillow knows: OpenCV decides below
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _read_still(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[tuple[int, np.ndarray]]:
    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
    head = _image_header(path)
    if head is not None and head[0] * head[1] > max_pixels:
        w, h, fmt = head
        factor = next(((k, f) for k, f in _REDUCED if w * h / (k * k) <= max_pixels), None)
        if fmt != "JPEG" or factor is None:
            raise SourceUnreadable(f"{w}x{h} image ({w * h / 1e6:.0f} Mpx) exceeds the pixel budget of "
                                   f"{max_pixels / 1e6:.0f} Mpx (--max-pixels) and cannot be decoded reduced"
                                   + ("" if fmt == "JPEG" else f" ({fmt})"))
        flags = factor[1]
    # imdecode on bytes rather than imread(path): no surprises with unusual characters in names
    data = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(data, flags)
    if img is None:
        raise SourceUnreadable(f"not a decodable {file_ext(path)[1:].upper()} image (corrupt or another format)")
    if img.ndim == 3 and img.shape[2] == 2:  # gray + alpha PNG: the alpha is no image content
        img = img[:, :, 0]
    yield 0, img


# ------------------------------------------------------------------------------------------- videos


def _read_video(path: Path, stride: int = 1, stream: FrameStream | None = None) -> Iterator[tuple[int, np.ndarray | None]]:
    """Frames in file order; frames the stride leaves out are only grabbed (no colour conversion) and
    yielded as None, so that they are still counted. Sets ``stream.header_frames`` for the containers
    whose header declares a frame count."""
    problem = _container_end_problem(path)
    if problem:
        raise SourceUnreadable(problem)
    log = _NativeStderr()
    log.start()
    try:
        cap = cv2.VideoCapture(str(path))
    finally:
        log.stop()
    try:
        if not cap.isOpened():
            said = f": {log.last_line()}" if log.last_line() else ""
            raise SourceUnreadable(f"OpenCV cannot open this video (truncated, corrupt or unknown codec){said}")
        declared = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        _check_frame_budget(int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                            stream.max_pixels if stream is not None else DEFAULT_MAX_PIXELS, "frames")
        if stream is not None and file_ext(path) in _HEADER_COUNTED and declared > 0:
            stream.header_frames = int(declared)
        index = 0
        first_message_at = None  # frame index at which the decoder first wrote to stderr
        while True:
            log.start()
            try:
                ok = cap.grab() if index % stride else None
                frame = None
                if ok is None:
                    ok, frame = cap.read()
            finally:
                if log.stop() and first_message_at is None:
                    first_message_at = index
            if not ok:
                break
            yield index, frame
            index += 1
            if first_message_at is not None and first_message_at < index - _TAIL_FRAMES:
                first_message_at = None  # an error mid-stream, not at its end: the clip goes on
        if first_message_at is not None:
            raise SourceUnreadable(f"truncated: the stream ends in a decode error ({log.last_line()!r}) "
                                   f"after {index} frames")
    finally:
        cap.release()
        log.close()


class _NativeStderr:
    """What FFmpeg or libjpeg (inside OpenCV) write to file descriptor 2 while a file is opened or a frame
    decoded: FFmpeg's only report of a damaged stream ("ac-tex damaged", "Error at MB", "LZW decode
    failed"). Captured call by call and remembered (last line) for the skip reason, not passed on: the
    run's stderr carries ingest's own one-line reports (a damaged frame mid-clip is no news to a user,
    and thousands of codec lines would bury the skipped-file list)."""

    def __init__(self) -> None:
        self._saved = None
        self._tmp = None
        self._last = b""

    def start(self) -> None:
        import tempfile

        if self._tmp is None:
            self._tmp = tempfile.TemporaryFile()
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._tmp.seek(0)
        self._tmp.truncate()
        os.dup2(self._tmp.fileno(), 2)

    def stop(self) -> bool:
        """Restore fd 2; True if something was written since start()."""
        if self._saved is None:
            return False
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._saved = None
        self._tmp.seek(0)
        text = self._tmp.read()
        if text.strip():
            self._last = text.strip().splitlines()[-1]
        return bool(text)

    def last_line(self) -> str:
        return self._last.decode("utf-8", "replace").strip()[:120]

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.close()
            self._tmp = None


@contextlib.contextmanager
def native_messages_dropped():
    """Point file descriptor 2 at a scratch file while this block decodes: FFmpeg and libjpeg write their
    warnings ("Corrupt JPEG data: ...", "[mjpeg @ 0x...] error y=4 x=7") there themselves, bypassing
    Python, and would bury ingest's own one-line reports. The video reader still sees (and keeps for its
    skip reasons) what FFmpeg writes during each frame, since its own capture nests inside this one.
    Process-wide, like every fd-2 redirection: for a process that decodes on one thread (ingest's
    workers), not for threads that decode side by side (the probe's)."""
    scratch = _NativeStderr()
    scratch.start()
    try:
        yield
    finally:
        scratch.close()


def _container_end_problem(path: Path) -> str | None:
    """Why a GIF or MPEG program stream is cut short (module doc), or None."""
    ext = file_ext(path)
    if ext == ".gif":
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return None if f.read(1) == b";" else "truncated: the GIF does not end with its trailer (0x3B)"
    if ext in (".mpeg", ".mpg"):
        return _mpeg_ps_end_problem(path)
    return None


def _mpeg_ps_end_problem(path: Path) -> str | None:
    """Walk an MPEG-1/2 program stream pack by pack; a packet whose declared length runs past the end of
    the file means the file was cut. Streams that are not program streams (elementary video) and streams
    with bytes we do not recognise mid-way are not judged (None)."""
    size = path.stat().st_size
    pos = 0
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            h = f.read(14)
            if len(h) < 6 or h[:3] != b"\0\0\1":
                return "truncated: the MPEG stream ends inside a packet header" if len(h) < 6 and pos else None
            code = h[3]
            if pos == 0 and code != 0xBA:
                return None  # not a program stream
            if code == 0xB9:  # program end code
                return None
            if code == 0xBA:  # pack header: MPEG-2 (14 bytes + stuffing) or MPEG-1 (12 bytes)
                n = 14 + (h[13] & 7) if (h[4] & 0xC0) == 0x40 and len(h) == 14 else 12
            elif code >= 0xBB:  # system header or PES packet: 6 bytes + declared length
                n = 6 + int.from_bytes(h[4:6], "big")
            else:
                return None
            pos += n
    if pos > size:
        return f"truncated: the last MPEG packet declares {pos - size} bytes beyond the end of the file"
    return None


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


def _check_frame_budget(width: int, height: int, max_pixels: int, what: str) -> None:
    """Frames of a video or volume larger than the pixel budget: skipped from the header, before any
    decoding (there is no reduced decode for them, as there is for JPEG stills)."""
    if width * height > max_pixels:
        raise SourceUnreadable(f"{width}x{height} {what} ({width * height / 1e6:.0f} Mpx) exceed the pixel budget "
                               f"of {max_pixels / 1e6:.0f} Mpx (--max-pixels)")


def _read_volume(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[tuple[int, np.ndarray]]:
    ext = file_ext(path)
    try:
        if ext in (".nii", ".nii.gz"):
            vol = _load_nifti(path, max_pixels)
            # NIfTI: frames are slices along the last spatial axis; a 4-D series (x, y, z, t) is flattened
            vol = vol.reshape(vol.shape[0], vol.shape[1], -1) if vol.ndim > 3 else vol
            axis = 2 if vol.ndim == 3 else None
        elif ext in (".nrrd", ".nhdr"):
            import nrrd

            sizes = [int(n) for n in nrrd.read_header(str(path))["sizes"]]  # x first
            _check_frame_budget(sizes[0], sizes[1] if len(sizes) > 1 else 1, max_pixels, "slices")
            vol, _ = nrrd.read(str(path), index_order="C")  # C order: [slowest, ..., fastest=x]
            axis = 0 if vol.ndim == 3 else None
        elif ext in (".mha", ".mhd"):
            vol = read_metaimage(path, max_pixels)
            axis = 0 if vol.ndim == 3 else None
        else:
            yield from _read_dicom(path, max_pixels)
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


def _load_nifti(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    import nibabel as nib

    img = nib.load(str(path))  # the header only: data is read by asanyarray below
    _check_frame_budget(img.shape[0], img.shape[1] if len(img.shape) > 1 else 1, max_pixels, "slices")
    if img.get_data_dtype().names:  # RGB NIfTI (structured dtype)
        raise SourceUnreadable("RGB NIfTI volumes are not supported")
    return np.asanyarray(img.dataobj)


def _read_dicom(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[tuple[int, np.ndarray]]:
    import pydicom

    try:
        head = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as e:
        raise SourceUnreadable(f"cannot read the DICOM header: {type(e).__name__}: {e}") from e
    _check_frame_budget(int(getattr(head, "Columns", 0) or 0), int(getattr(head, "Rows", 0) or 0), max_pixels, "frames")
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


def read_metaimage(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
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
    if max_pixels is not None:
        _check_frame_budget(dims[0], dims[1] if len(dims) > 1 else 1, max_pixels, "slices")
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
