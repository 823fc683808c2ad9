"""Image dimensions from the encoded bytes, without decoding (JPEG and PNG headers).

The DALI loader draws each crop in Python (so augmentation stays a pure function of
(seed, epoch, index), as in :class:`ssld.data.train.TrainTransform`), which needs the
decoded image's height and width before the GPU decodes it. For JPEG this walks the marker
segments to the frame header (SOFn) and applies the EXIF orientation (tags 5-8 swap height
and width, as OpenCV and DALI rotate on decode, read as they read it; of several EXIF
segments the last counts, as in DALI); for PNG it reads IHDR and an ``eXIf`` chunk. Other
formats, and JPEGs whose header does not parse, give None (the caller falls back to a full
decode).
"""

from __future__ import annotations

_PNG = b"\x89PNG\r\n\x1a\n"
# SOFn markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# markers without a length field: TEM, RSTn, SOI
_STANDALONE = frozenset([0x01, 0xD8, *range(0xD0, 0xD8)])


def _u16(b, i: int, little: bool) -> int:
    return int.from_bytes(b[i : i + 2], "little" if little else "big")


def exif_orientation(tiff) -> int:
    """The Orientation tag (0x0112) of IFD0 of an EXIF TIFF block, 1 when absent or bad."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    little = tiff[:2] == b"II"
    if _u16(tiff, 2, little) != 42:
        return 1
    ifd = int.from_bytes(tiff[4:8], "little" if little else "big")
    if ifd + 2 > len(tiff):
        return 1
    count = _u16(tiff, ifd, little)
    for k in range(count):
        e = ifd + 2 + 12 * k
        if e + 12 > len(tiff):
            break
        if _u16(tiff, e, little) == 0x0112:
            # the first 16 bits of the value field, whatever the declared type: what OpenCV
            # and DALI read (so a LONG counts in little-endian files only, as there)
            value = _u16(tiff, e + 8, little)
            return value if 1 <= value <= 8 else 1
    return 1


def jpeg_size(b) -> tuple[int, int] | None:
    """(height, width) after EXIF orientation of a baseline/progressive JPEG with 8-bit
    samples and 1, 3 or 4 components whose scan data starts (an SOS marker follows the
    frame header); None otherwise."""
    n = len(b)
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return None
    i, orientation, size = 2, 1, None
    while i + 4 <= n:
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        seg = _u16(b, i + 2, False)
        if seg < 2 or i + 2 + seg > n:
            return None
        body = b[i + 4 : i + 2 + seg]
        if marker == 0xE1 and body[:6] == b"Exif\x00\x00":
            orientation = exif_orientation(body[6:])
        elif marker in _SOF:
            if len(body) < 6 or body[0] != 8 or body[5] not in (1, 3, 4):
                return None
            h, w = _u16(body, 1, False), _u16(body, 3, False)
            if h == 0 or w == 0:  # height 0 = defined later by DNL: not supported
                return None
            size = (h, w)
        elif marker == 0xDA:  # start of scan: the header is complete
            if size is None:
                return None
            return (size[1], size[0]) if orientation >= 5 else size
        elif marker == 0xD9:  # end of image before any scan
            return None
        i += 2 + seg
    return None


def png_size(b) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR chunk after the orientation of an ``eXIf`` chunk
    before the image data (OpenCV and DALI apply it), None if it is not a PNG."""
    if len(b) < 24 or bytes(b[:8]) != _PNG or bytes(b[12:16]) != b"IHDR":
        return None
    w, h = int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")
    if not (h and w):
        return None
    i, orientation = 8, 1
    while i + 8 <= len(b):  # chunks: length, type, data, crc
        size, kind = int.from_bytes(b[i : i + 4], "big"), bytes(b[i + 4 : i + 8])
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"eXIf":
            orientation = exif_orientation(b[i + 8 : i + 8 + size])
        i += 12 + size
    return (w, h) if orientation >= 5 else (h, w)


def jpeg_complete(b) -> bool:
    """Whether a JPEG's end-of-image marker follows its first scan (a cut file has none;
    inside entropy-coded data 0xFF is always followed by 0x00 or a restart marker)."""
    data = bytes(b)
    sos = data.find(b"\xff\xda")
    return sos >= 0 and data.find(b"\xff\xd9", sos) >= 0


def image_size(b) -> tuple[int, int] | None:
    """(height, width) of the image a decoder would produce from the bytes ``b`` (bytes,
    memoryview or uint8 array), or None when the format is not JPEG/PNG or the header is
    invalid or truncated."""
    b = memoryview(b).cast("B") if not isinstance(b, (bytes, bytearray)) else b
    if len(b) >= 2 and b[0] == 0xFF and b[1] == 0xD8:
        return jpeg_size(b)
    return png_size(b)
