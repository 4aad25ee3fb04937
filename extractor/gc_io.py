"""Grand Challenge sockets: read `/input/inputs.json`, resolve inputs by slug, write outputs.

Generic, knows no challenge. On the platform every job's `/input` holds one file per input
socket plus `inputs.json`, the list of socket values the platform serialises for the job
(grand-challenge.org, `components/backends/base.py` `_with_inputs_json` and
`components/serializers.py` `ComponentInterfaceValueSerializer`). Each item reads::

    {"pk": ..., "value": ..., "file": ..., "image": {"pk": ..., "name": ...} | null,
     "socket":    {"slug": ..., "kind": ..., "super_kind": "Value" | "Image" | "File",
                   "relative_path": ..., "title": ..., ...},
     "interface": {... the same object, kept for older algorithms ...}}

Where the value lives follows `super_kind`:

* ``Value``: inline in `value`; the platform also writes it, as JSON, to `/input/<relative_path>`.
* ``File``: a file at `/input/<relative_path>` (parsed as JSON when the path ends in `.json`).
* ``Image``: a folder `/input/<relative_path>/` holding one image file (`.mha`, `.tif`, ...).

Outputs go to `/output/<relative_path>` (JSON values, written atomically) and images to
`/output/<relative_path>/output.mha` through SimpleITK. Errors name the file, the socket slug
and what was expected.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import orjson

from extractor.dragon_io import atomic_write

log = logging.getLogger(__name__)

INPUTS_JSON = "inputs.json"
IMAGE_SUFFIXES = (".mha", ".mhd", ".nii.gz", ".nii", ".nrrd", ".tif", ".tiff")
SUPER_KINDS = ("Value", "Image", "File")
# SimpleITK's placeholder for metadata values it cannot print (ITK_original_direction, ...).
_UNPRINTABLE = "[UNKNOWN_PRINT_CHARACTERISTICS]"


class SocketError(Exception):
    """An input or output socket that cannot be used; the message names file, slug and expectation."""


@dataclass(frozen=True)
class Socket:
    """One socket (component interface) as the platform describes it."""

    slug: str
    relative_path: str
    super_kind: str = "Value"
    kind: str = "Anything"
    title: str = field(default="", compare=False)  # display only

    def __post_init__(self) -> None:
        if self.super_kind not in SUPER_KINDS:
            raise SocketError(
                f"socket {self.slug!r}: super_kind {self.super_kind!r} is not one of {', '.join(SUPER_KINDS)}"
            )
        rel = Path(self.relative_path)
        if not self.relative_path or rel.is_absolute() or ".." in rel.parts:
            raise SocketError(f"socket {self.slug!r}: relative_path {self.relative_path!r} must stay inside the folder")

    @property
    def is_image(self) -> bool:
        return self.super_kind == "Image"

    @property
    def is_json(self) -> bool:
        """Values of this socket are JSON: Value sockets and `*.json` paths (the rule
        grand-challenge-forge's templates use); other File sockets are plain files."""
        return self.super_kind == "Value" or self.relative_path.endswith(".json")

    @classmethod
    def from_json(cls, data: Any, where: str) -> Socket:
        if not isinstance(data, dict):
            raise SocketError(f"{where}: expected a socket object, got {type(data).__name__}")
        missing = [k for k in ("slug", "relative_path", "super_kind") if not isinstance(data.get(k), str)]
        if missing:
            raise SocketError(f"{where}: socket field(s) {', '.join(missing)} missing or not strings")
        try:
            return cls(
                slug=data["slug"],
                relative_path=data["relative_path"],
                super_kind=data["super_kind"],
                kind=str(data.get("kind") or "Anything"),
                title=str(data.get("title") or ""),
            )
        except SocketError as err:
            raise SocketError(f"{where}: {err}") from None


@dataclass(frozen=True)
class SocketValue:
    """One item of inputs.json: the socket and, for Value sockets, the inline value."""

    socket: Socket
    value: Any = None
    has_inline_value: bool = False
    image_name: str | None = None


@dataclass(frozen=True, eq=False)
class ImageData:
    """An image as read by SimpleITK: the voxel array in numpy (z, y, x) order, and the
    geometry in ITK (x, y, z) order."""

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)
    path: Path | None = None
    pixel_type: str = ""

    def __post_init__(self) -> None:
        view = self.array.view()  # read-only, without touching the caller's array
        view.setflags(write=False)
        object.__setattr__(self, "array", view)
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    @property
    def dimension(self) -> int:
        return len(self.spacing)

    @property
    def size(self) -> tuple[int, ...]:
        """Voxels along x, y(, z), as ITK counts them (vector pixels' components left out)."""
        return tuple(int(n) for n in reversed(self.array.shape[: self.dimension]))

    @property
    def extent_mm(self) -> tuple[float, ...]:
        """Physical size along each axis: voxels times spacing."""
        return tuple(n * s for n, s in zip(self.size, self.spacing, strict=True))

    def to_sitk(self) -> Any:
        """The image as a SimpleITK image, geometry and metadata included."""
        import SimpleITK as sitk

        vector = self.array.ndim > self.dimension
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array), isVector=vector)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        for key, value in self.metadata.items():
            image.SetMetaData(key, value)
        return image

    @classmethod
    def from_sitk(cls, image: Any, path: Path | None = None) -> ImageData:
        import SimpleITK as sitk

        metadata = {}
        for key in image.GetMetaDataKeys():
            value = image.GetMetaData(key)
            if not value.startswith(_UNPRINTABLE):
                metadata[key] = value
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
            metadata=metadata,
            path=path,
            pixel_type=image.GetPixelIDTypeAsString(),
        )


def _read_json_file(path: Path, slug: str) -> Any:
    if not path.is_file():
        raise SocketError(f"{path}: missing file for socket {slug!r} (expected a JSON file)")
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as err:
        raise SocketError(f"{path}: socket {slug!r}: expected JSON, the file is malformed: {err}") from None
    except OSError as err:
        raise SocketError(f"{path}: socket {slug!r}: cannot read the file: {err}") from None


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and name.endswith(IMAGE_SUFFIXES)


def load_image(path: Path, slug: str = "?") -> ImageData:
    """Read one image file with SimpleITK."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise SocketError(f"{path}: missing image file for socket {slug!r}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise SocketError(
            f"{path}: socket {slug!r}: expected an image SimpleITK can read ({', '.join(IMAGE_SUFFIXES)}): {first}"
        ) from None
    return ImageData.from_sitk(image, path)


def find_image_file(folder: Path, slug: str, name: str | None = None) -> Path:
    """The one image file in a socket's folder (by the platform's image name when several)."""
    if not folder.is_dir():
        hint = " (a file, not a folder)" if folder.exists() else ""
        raise SocketError(f"{folder}: missing image folder for socket {slug!r}{hint}")
    found = sorted(p for p in folder.iterdir() if is_image_file(p))
    if len(found) > 1 and name:
        named = [p for p in found if p.name == name]
        found = named or found
    if len(found) != 1:
        what = ", ".join(p.name for p in found) if found else "none"
        raise SocketError(
            f"{folder}: socket {slug!r}: expected exactly one image file ({', '.join(IMAGE_SUFFIXES)}), found {what}"
        )
    return found[0]


class Inputs:
    """The input sockets of one job, resolved by slug."""

    def __init__(self, input_dir: Path, values: Mapping[str, SocketValue], source: str) -> None:
        self.input_dir = Path(input_dir)
        self._values = dict(values)
        self.source = source  # inputs.json, or a note that the known sockets were assumed

    @property
    def slugs(self) -> tuple[str, ...]:
        return tuple(self._values)

    def __contains__(self, slug: object) -> bool:
        return slug in self._values

    def socket(self, slug: str) -> Socket:
        return self._get(slug).socket

    def _get(self, slug: str) -> SocketValue:
        try:
            return self._values[slug]
        except KeyError:
            present = ", ".join(sorted(self._values)) or "none"
            raise SocketError(f"{self.source}: no input socket {slug!r} (present: {present})") from None

    def path(self, slug: str) -> Path:
        """Where the socket's value lies: a file, or for images their folder."""
        return self.input_dir / self._get(slug).socket.relative_path

    def json(self, slug: str) -> Any:
        """A JSON value: inline for Value sockets, else parsed from the socket's file."""
        item = self._get(slug)
        if item.socket.is_image:
            raise SocketError(f"{self.path(slug)}: socket {slug!r} is an image socket, not a JSON value")
        if item.has_inline_value and item.value is not None:
            return item.value
        if not item.socket.is_json:
            raise SocketError(
                f"{self.path(slug)}: socket {slug!r} of kind {item.socket.kind!r} is not JSON; use text() or path()"
            )
        return _read_json_file(self.path(slug), slug)

    def text(self, slug: str) -> str:
        """A text value: a JSON string (String sockets) or the file's text (plain-text files)."""
        item = self._get(slug)
        if item.socket.is_json:
            value = self.json(slug)
            if not isinstance(value, str):
                raise SocketError(f"{self.path(slug)}: socket {slug!r}: expected a string, got {type(value).__name__}")
            return value
        path = self.path(slug)
        if not path.is_file():
            raise SocketError(f"{path}: missing file for socket {slug!r} (expected a text file)")
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise SocketError(f"{path}: socket {slug!r}: expected UTF-8 text: {err}") from None

    def image_path(self, slug: str) -> Path:
        item = self._get(slug)
        if not item.socket.is_image:
            raise SocketError(
                f"{self.path(slug)}: socket {slug!r} has super_kind {item.socket.super_kind!r}, not an image"
            )
        return find_image_file(self.path(slug), slug, item.image_name)

    def image(self, slug: str) -> ImageData:
        return load_image(self.image_path(slug), slug)


def parse_inputs_json(data: Any, where: str) -> dict[str, SocketValue]:
    """The socket values of an inputs.json document, keyed by slug."""
    if not isinstance(data, list):
        raise SocketError(f"{where}: expected a JSON array of socket values, got {type(data).__name__}")
    values: dict[str, SocketValue] = {}
    for i, item in enumerate(data):
        at = f"{where}: item {i}"
        if not isinstance(item, dict):
            raise SocketError(f"{at}: expected an object, got {type(item).__name__}")
        described = item.get("socket", item.get("interface"))
        if described is None:
            raise SocketError(f"{at}: neither 'socket' nor 'interface' describes the socket")
        socket = Socket.from_json(described, at)
        if socket.slug in values:
            raise SocketError(f"{at}: socket {socket.slug!r} listed twice")
        image = item.get("image")
        values[socket.slug] = SocketValue(
            socket=socket,
            value=item.get("value"),
            has_inline_value=socket.super_kind == "Value" and "value" in item,
            image_name=image.get("name") if isinstance(image, dict) else None,
        )
    return values


def read_inputs(input_dir: Path, known: Sequence[Socket] = ()) -> Inputs:
    """The job's input sockets from `<input_dir>/inputs.json`; without it, the `known` sockets
    (their files read from their relative paths), or an error when none are known."""
    input_dir = Path(input_dir)
    manifest = input_dir / INPUTS_JSON
    if manifest.is_file():
        try:
            data = orjson.loads(manifest.read_bytes())
        except orjson.JSONDecodeError as err:
            raise SocketError(f"{manifest}: malformed JSON: {err}") from None
        return Inputs(input_dir, parse_inputs_json(data, str(manifest)), str(manifest))
    if not known:
        raise SocketError(f"{manifest}: missing (expected the platform's list of input sockets)")
    log.info("%s absent: assuming the sockets %s", manifest, ", ".join(s.slug for s in known))
    values = {s.slug: SocketValue(socket=s) for s in known}
    return Inputs(input_dir, values, f"{input_dir} (no {INPUTS_JSON}; known sockets assumed)")


# -- outputs ----------------------------------------------------------------------------------


def output_path(output_dir: Path, socket: Socket) -> Path:
    """Where the platform collects the socket: the file, or for images the folder."""
    return Path(output_dir) / socket.relative_path


def write_json(output_dir: Path, socket: Socket, value: Any) -> Path:
    """Write a JSON value to the socket's path, complete or not at all (temp file, then rename)."""
    if socket.is_image:
        raise SocketError(f"socket {socket.slug!r} is an image socket; use write_image")
    try:
        data = orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as err:
        raise SocketError(f"socket {socket.slug!r}: value is not JSON-serialisable: {err}") from None
    target = output_path(output_dir, socket)
    atomic_write(target, data)
    return target


def write_text(output_dir: Path, socket: Socket, text: str) -> Path:
    """Write a plain-text file socket (atomic)."""
    target = output_path(output_dir, socket)
    atomic_write(target, text.encode("utf-8"))
    return target


def write_image(output_dir: Path, socket: Socket, image: Any, *, name: str = "output.mha") -> Path:
    """Write an image (ImageData, a SimpleITK image or a numpy array) as the one file of the
    socket's output folder; written under a temporary name and renamed, so the folder never
    holds a partial image."""
    import SimpleITK as sitk

    if not socket.is_image:
        raise SocketError(f"socket {socket.slug!r} has super_kind {socket.super_kind!r}; use write_json")
    if not name.lower().endswith(IMAGE_SUFFIXES):
        raise SocketError(f"socket {socket.slug!r}: output name {name!r} needs one of {', '.join(IMAGE_SUFFIXES)}")
    if isinstance(image, ImageData):
        image = image.to_sitk()
    elif isinstance(image, np.ndarray):
        image = sitk.GetImageFromArray(image)
    folder = output_path(output_dir, socket)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    tmp = folder / f".partial-{os.getpid()}-{name}"
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except RuntimeError as err:
        tmp.unlink(missing_ok=True)
        raise SocketError(f"{target}: socket {socket.slug!r}: SimpleITK could not write the image: {err}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def inputs_json(values: Iterable[tuple[Socket, Any]]) -> list[dict[str, Any]]:
    """An inputs.json document as the platform writes it, for local runs and tests.

    `values` pairs each socket with its inline value (Value sockets) or, for images, the image
    file's name (or None)."""
    items = []
    for pk, (socket, value) in enumerate(values, start=1):
        described = {
            "title": socket.title or socket.slug.replace("-", " ").capitalize(),
            "description": "",
            "slug": socket.slug,
            "kind": socket.kind,
            "pk": pk,
            "default_value": None,
            "super_kind": socket.super_kind,
            "relative_path": socket.relative_path,
            "overlay_segments": [],
            "look_up_table": None,
        }
        items.append(
            {
                "socket": described,
                "interface": described,
                "value": value if socket.super_kind == "Value" else None,
                "file": None,
                "image": {"pk": f"image-{pk}", "name": value} if socket.is_image and value else None,
                "pk": pk,
            }
        )
    return items
