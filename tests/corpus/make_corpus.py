"""Hostile input for faceindex, generated (nothing downloaded, nothing binary committed) from the bundled samples.

``build(root)`` fills ``root`` with every kind of file that has hurt, or could hurt, an indexer: broken and fake
images, decompression bombs, odd pixel formats, EXIF orientations 1-8, FIFOs, sockets, devices, folders named like
photos, symlink loops and links out of the tree, unreadable files and folders, names that are not UTF-8 or hold
newlines, quotes and HTML, very deep folders. It returns what faceindex must do with each: ``indexed`` (with so
many faces), ``no_face``, ``failed`` (with a reason starting with one of the given prefixes) or ``skipped`` (never
opened, never recorded). Kinds the machine cannot make (a device file without root) are left out and listed.

Run alone: ``python tests/corpus/make_corpus.py DEST`` builds it and prints the expectations.
"""

from __future__ import annotations

import io
import os
import random
import socket
import stat
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
FACE = REPO / "samples" / "photos" / "obama" / "obama_small.jpg"  # 320x240, one face
DEPTH = 100  # folders deep (the report that started this had 40)
# PIL's save method that undoes each EXIF orientation (exif_transpose applies the inverse when reading).
_UNDO_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                     4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
                     7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
NOT_IMAGE = ("not an image",)
BROKEN = ("corrupt", "not an image")


@dataclass(frozen=True)
class Expect:
    status: str                      # indexed | no_face | failed | skipped
    faces: int = 0                   # indexed: how many faces
    reasons: tuple[str, ...] = ()    # failed: the recorded reason starts with one of these
    kind: str = ""                   # what this file is, for messages and the README's count


@dataclass
class Corpus:
    root: Path
    expected: dict[str, Expect]      # absolute path (str, as os.fsdecode gives it) -> what must happen
    as_root: dict[str, Expect]       # what differs when the reader is root (it reads mode-000 files and folders)
    left_out: list[str]              # kinds this machine could not make, with why

    def expectations(self, as_root: bool) -> dict[str, Expect]:
        return {**self.expected, **self.as_root} if as_root else self.expected


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A ~1 KB PNG that declares 60000x60000 pixels (3.6 gigapixels) of zeros."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def oriented(face: Image.Image, orientation: int) -> bytes:
    """A JPEG whose stored pixels, turned by its EXIF orientation tag, show ``face`` upright."""
    stored = face if orientation == 1 else face.transpose(_UNDO_ORIENTATION[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(stored, exif=exif.tobytes())


class _Builder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.expected: dict[str, Expect] = {}
        self.as_root: dict[str, Expect] = {}
        self.left_out: list[str] = []
        self.face = Image.open(FACE).convert("RGB")
        self.face_jpeg = FACE.read_bytes()

    def put(self, rel: str | bytes, data: bytes | None, expect: Expect) -> Path:
        path = Path(os.fsdecode(os.path.join(os.fsencode(self.root), os.fsencode(rel))))
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        self.expected[str(path)] = expect
        return path

    def special(self, rel: str, make, expect: Expect, kind: str) -> None:
        path = self.root / rel
        try:
            make(path)
        except (OSError, PermissionError) as exc:
            self.left_out.append(f"{kind}: {exc.strerror or exc}")
            return
        self.expected[str(path)] = expect

    def build(self) -> Corpus:
        self.images()
        self.broken()
        self.names()
        self.special_files()
        self.links()
        self.unreadable()
        return Corpus(self.root, self.expected, self.as_root, self.left_out)

    def images(self) -> None:
        self.put("good.jpg", self.face_jpeg, Expect("indexed", 1, kind="a plain JPEG"))
        self.put("cmyk.jpg", jpeg(self.face.convert("CMYK")), Expect("indexed", 1, kind="CMYK JPEG"))
        gray16 = (np.asarray(self.face.convert("L"), dtype=np.uint16) * 257).astype("<u2")
        buf = io.BytesIO()
        Image.frombytes("I;16", self.face.size, gray16.tobytes()).save(buf, "PNG")
        self.put("gray16.png", buf.getvalue(), Expect("indexed", 1, kind="16-bit grayscale PNG"))
        buf = io.BytesIO()
        frames = [self.face, self.face.transpose(Image.Transpose.FLIP_LEFT_RIGHT), Image.new("RGB", (320, 240))]
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
        self.put("animated.gif", buf.getvalue(), Expect("indexed", 1, kind="animated GIF (first frame)"))
        rgba = self.face.convert("RGBA")
        alpha = Image.new("L", rgba.size, 0)
        alpha.paste(255, (20, 10, rgba.width - 20, rgba.height - 10))  # a transparent frame around the photo
        rgba.putalpha(alpha)
        buf = io.BytesIO()
        rgba.save(buf, "PNG")
        self.put("rgba.png", buf.getvalue(), Expect("indexed", 1, kind="PNG with alpha"))
        for fmt, ext in (("TIFF", "tif"), ("WEBP", "webp"), ("BMP", "bmp")):
            buf = io.BytesIO()
            self.face.save(buf, fmt)
            self.put(f"format.{ext}", buf.getvalue(), Expect("indexed", 1, kind=f"{fmt}"))
        for o in range(1, 9):
            self.put(f"exif/orientation{o}.jpg", oriented(self.face, o), Expect("indexed", 1, kind=f"EXIF {o}"))
        self.put("/".join(["d"] * DEPTH) + "/deep.jpg", self.face_jpeg, Expect("indexed", 1, kind="100 folders deep"))
        self.put("folder.jpg/inner.jpg", self.face_jpeg, Expect("indexed", 1, kind="a photo in a folder named x.jpg"))
        self.put("sky.jpg", jpeg(Image.new("RGB", (640, 480), (90, 140, 200))), Expect("no_face", kind="no face"))
        buf = io.BytesIO()
        Image.new("RGB", (1, 1)).save(buf, "PNG")
        self.put("pixel.png", buf.getvalue(), Expect("no_face", kind="a 1x1 image"))

    def broken(self) -> None:
        data = self.face_jpeg
        rng = random.Random(1313)
        self.put("truncated.jpg", data[: len(data) // 2], Expect("failed", reasons=BROKEN, kind="truncated JPEG"))
        self.put("header_only.jpg", data[:20], Expect("failed", reasons=BROKEN, kind="JPEG header only"))
        self.put("empty.jpg", b"", Expect("failed", reasons=("empty file",), kind="empty file"))
        self.put("text.jpg", b"hello, I am a text file with a .jpg name\n" * 20,
                 Expect("failed", reasons=NOT_IMAGE, kind="text"))
        self.put("page.png", b"<!doctype html><html><body><script>alert(1)</script></body></html>\n",
                 Expect("failed", reasons=NOT_IMAGE, kind="HTML"))
        self.put("random.jpg", bytes(rng.getrandbits(8) for _ in range(50_000)),
                 Expect("failed", reasons=BROKEN, kind="random bytes"))
        self.put("bomb.png", png_bomb(), Expect("failed", reasons=("too large",), kind="60000x60000 PNG bomb"))
        buf = io.BytesIO()
        Image.new("RGB", (200, 200)).save(buf, "PNG")
        self.put("truncated.png", buf.getvalue()[:-30], Expect("failed", reasons=BROKEN, kind="truncated PNG"))
        oversized = self.put("oversized.jpg", None, Expect("failed", reasons=("too large",), kind="201 MB (sparse)"))
        with open(oversized, "wb") as fh:
            fh.truncate(201 * 2**20)  # sparse: costs no disk; over ingest.max_file_mb, so never read
        self.put(".hidden.jpg", data, Expect("skipped", kind="hidden file"))
        self.put("download.jpg.part", data, Expect("skipped", kind="partial download"))
        self.put("notes.txt", data, Expect("skipped", kind="other extension"))

    def names(self) -> None:
        data = self.face_jpeg
        self.put("new\nline.jpg", data, Expect("indexed", 1, kind="newline in the name"))
        self.put("it's \"quoted\".jpg", data, Expect("indexed", 1, kind="quotes in the name"))
        self.put("<b onmouseover=alert(1)>x<b> &amp;.jpg", data, Expect("indexed", 1, kind="HTML in the name"))
        self.put(b"latin1-\xe9t\xe9.jpg", data, Expect("indexed", 1, kind="Latin-1 (not UTF-8) name"))
        self.put("-rf --help.jpg", data, Expect("indexed", 1, kind="name like an option"))
        self.put("x" * 251 + ".jpg", data, Expect("indexed", 1, kind="255-byte name"))
        # Failed ones, so that `status` shows these names too.
        self.put(b"broken-caf\xe9\n<i>.jpg", b"not a photo", Expect("failed", reasons=NOT_IMAGE,
                                                                    kind="Latin-1, newline and HTML, failed"))

    def special_files(self) -> None:
        skipped = Expect("skipped", kind="not a regular file")
        self.special("fifo.jpg", os.mkfifo, skipped, "FIFO")

        def make_socket(path: Path) -> None:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(str(path))  # the socket file stays after the socket is closed

        self.special("socket.jpg", make_socket, skipped, "socket")
        self.special("device.jpg", lambda p: os.mknod(p, stat.S_IFCHR | 0o644, os.makedev(1, 3)), skipped,
                     "character device (like /dev/null)")
        self.put("empty_folder.jpg/.keep", b"", Expect("skipped", kind="folder named x.jpg"))

    def links(self) -> None:
        outside = self.root.parent / (self.root.name + "-outside")
        outside.mkdir(exist_ok=True)
        (outside / "photo.jpg").write_bytes(self.face_jpeg)
        links = {
            "loop_dir": ".",                        # a folder link to its own parent: a cycle
            "loop_a.jpg": "loop_b.jpg", "loop_b.jpg": "loop_a.jpg",
            "outside.jpg": str(outside / "photo.jpg"),
            "outside_dir": str(outside),
            "zero.jpg": "/dev/zero",
            "broken.jpg": "nowhere.jpg",
            "fifo_link.jpg": "fifo.jpg",
        }
        for name, target in links.items():
            os.symlink(target, self.root / name)
            if name.endswith(".jpg"):
                self.expected[str(self.root / name)] = Expect("skipped", kind=f"symlink to {target}")
        os.symlink("good.jpg", self.root / "inside_link.jpg")
        self.expected[str(self.root / "inside_link.jpg")] = Expect("indexed", 1, kind="symlink inside the tree")

    def unreadable(self) -> None:
        data = self.face_jpeg
        locked = self.put("locked.jpg", data, Expect("failed", reasons=("unreadable: permission denied",),
                                                     kind="unreadable file"))
        locked.chmod(0)
        self.as_root[str(locked)] = Expect("indexed", 1, kind="mode 000 file, read by root")
        inner = self.put("locked_dir/photo.jpg", data, Expect("skipped", kind="photo in an unreadable folder"))
        inner.parent.chmod(0)
        self.as_root[str(inner)] = Expect("indexed", 1, kind="photo in a mode 000 folder, read by root")


def build(root: Path) -> Corpus:
    """Fill ``root`` (created) with the corpus and say what faceindex must do with each file."""
    root.mkdir(parents=True, exist_ok=True)
    return _Builder(root).build()


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: make_corpus.py DEST")
    corpus = build(Path(sys.argv[1]).absolute())
    for path, expect in sorted(corpus.expectations(os.geteuid() == 0).items()):
        print(f"{expect.status:<8} {expect.faces}  {ascii(path)}  {expect.kind}")
    for why in corpus.left_out:
        print(f"left out: {why}")


if __name__ == "__main__":
    main()
