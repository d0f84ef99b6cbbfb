"""Image sources for the embedding precompute: webdataset tars and image folders as records.

:func:`iter_tar_records` (webdataset shards in the DataComp layout: ``KEY.jpg``/``.png`` with
``KEY.txt``/``.json`` captions, streamed) and :func:`iter_folder_records` (an image folder with
a JSONL file or an image list) yield :class:`ImageRecord`: a key, where it came from (for
messages), the encoded image or the path to read it from, the caption if any, and a skip
reason already known before decoding (a missing image, an unreadable caption).
:func:`expand_tar_inputs` and :func:`count_folder_records` tell the tool what it will read.
Inputs are read in a fixed order, so a resumed precompute sees the records as the first run did.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

from megatron_vlm.data.image_io import (
    SKIP_BAD_CAPTION,
    SKIP_MISSING,
    SKIP_UNREADABLE,
    ImageDecodeError,
)

# Webdataset member extensions: images in order of preference, then caption files.
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TAR_CAPTION_EXTS = ("txt", "json")


@dataclass
class ImageRecord:
    """One image-caption pair to embed. ``source`` says where it came from, for messages."""

    key: str
    source: str
    data: Optional[bytes] = None       # the encoded image (webdataset inputs)
    path: Optional[str] = None         # the image file, read when needed (folder inputs)
    caption: Optional[str] = None
    problem: Optional[Tuple[str, str]] = None   # (skip reason, detail) known before decoding

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.path is None:
            raise ImageDecodeError(SKIP_MISSING, "no image")
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ImageDecodeError(SKIP_MISSING, f"no such file: {self.path}") from None
        except OSError as err:
            raise ImageDecodeError(SKIP_UNREADABLE, f"cannot read {self.path}: {err}") from None


def expand_tar_inputs(paths: Sequence[str]) -> List[str]:
    """Tar files in processing order: each path as given, a directory as its sorted ``*.tar``."""
    out: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            tars = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".tar"))
            if not tars:
                raise FileNotFoundError(f"--tar {path}: directory holds no *.tar files")
            out.extend(tars)
        elif os.path.isfile(path):
            out.append(path)
        else:
            raise FileNotFoundError(f"--tar {path}: no such file or directory")
    return out


def _split_member_name(name: str) -> Tuple[str, str]:
    """Webdataset convention: key = path up to the first dot of the base name; ext = the rest."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(directory, stem) if directory else stem), ext.lower()


def _tar_record(tar_path: str, key: str, members: Dict[str, bytes]) -> ImageRecord:
    caption: Optional[str] = None
    problem: Optional[Tuple[str, str]] = None
    if "txt" in members:
        try:
            caption = members["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as err:
            problem = (SKIP_BAD_CAPTION, f"{key}.txt is not UTF-8 text ({err})")
    elif "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            problem = (SKIP_BAD_CAPTION, f"{key}.json is not valid JSON ({err})")
        else:
            value = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
            if value is not None and not isinstance(value, str):
                problem = (SKIP_BAD_CAPTION, f"{key}.json field 'caption' is {type(value).__name__}, not a string")
            elif value is not None:
                caption = value.strip()
    ext = next((e for e in TAR_IMAGE_EXTS if e in members), None)
    if ext is None:
        return ImageRecord(key, f"{tar_path}:{key}", caption=caption,
                           problem=(SKIP_MISSING, f"no image member ({'/'.join('.' + e for e in TAR_IMAGE_EXTS)}) "
                                                  f"for key {key!r} in {tar_path}"))
    return ImageRecord(key, f"{tar_path}:{key}.{ext}", data=members[ext], caption=caption, problem=problem)


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Remembers why a tar's member list ended. :mod:`tarfile` stops quietly both at the
    end-of-archive marker (a zero block) and where the file simply runs out (a download or copy
    cut at a member boundary, or inside a header), so a cut archive would pass for a complete
    one with fewer members; the header error it swallows tells the two apart."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:
            tar.end_reason = err
            raise


def _check_archive_end(tar: tarfile.TarFile, tar_path: str, last_member: str) -> None:
    """ValueError naming the tar unless its members ended at the end-of-archive marker.

    One zero block is enough: tar writers add a second one and padding, which hold no data."""
    reason = getattr(tar, "end_reason", None)
    if isinstance(reason, tarfile.EOFHeaderError):
        return
    if isinstance(reason, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
        what = "ends without the end-of-archive blocks"
    else:  # a block that is neither a header nor the end marker
        what = f"has a damaged header ({reason})"
    raise ValueError(f"{tar_path}: truncated or damaged tar: it {what} after member "
                     f"{last_member!r} (byte {tar.offset}), so the members after it are missing; "
                     f"copy or download the file again")


def iter_tar_records(paths: Sequence[str], skip_keys: Optional[Set[str]] = None) -> Iterator[ImageRecord]:
    """Records of webdataset tar shards (DataComp layout: KEY.jpg/.png with KEY.txt/.json), streamed.

    Consecutive members with the same key form one record. Members of keys in ``skip_keys`` are
    not read into memory (their records come back without data). A tar that is cut short (also
    exactly at a member boundary) or damaged raises ValueError naming it, after the records
    before the damage.
    """
    wanted = set(TAR_IMAGE_EXTS) | set(TAR_CAPTION_EXTS)
    skip_keys = skip_keys or set()
    for tar_path in expand_tar_inputs(paths):
        current: Optional[str] = None
        members: Dict[str, bytes] = {}
        last_member = "(start of file)"
        try:
            with tarfile.open(tar_path, mode="r|*", tarinfo=_EndCheckingTarInfo) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_member_name(member.name)
                    if key != current:
                        if current is not None:
                            yield _tar_record(tar_path, current, members)
                        current, members = key, {}
                    if ext in wanted and key not in skip_keys:
                        handle = tar.extractfile(member)
                        members[ext] = handle.read() if handle is not None else b""
                    elif ext in wanted:
                        members[ext] = b""
                    last_member = member.name
                _check_archive_end(tar, tar_path, last_member)
                if current is not None:
                    yield _tar_record(tar_path, current, members)
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"{tar_path}: not a readable tar file after member {last_member!r} ({err})") from None


def _jsonl_records(image_folder: str, jsonl: str) -> Iterator[ImageRecord]:
    with open(jsonl, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{jsonl}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: a record must be a JSON object with 'image' (and 'key', "
                                 f"'caption'); got {type(rec).__name__}")
            image = rec.get("image")
            if not isinstance(image, str) or not image:
                raise ValueError(f"{where}: field 'image' must be a non-empty string (a path relative to "
                                 f"{image_folder}); got {image!r}")
            key = rec.get("key", image)
            if isinstance(key, int) and not isinstance(key, bool):
                key = str(key)
            if not isinstance(key, str) or not key:
                raise ValueError(f"{where}: field 'key' must be a non-empty string; got {key!r}")
            caption = rec.get("caption")
            if caption is not None and not isinstance(caption, str):
                raise ValueError(f"{where}: field 'caption' of key {key!r} must be a string or null; "
                                 f"got {type(caption).__name__}")
            yield _folder_record(image_folder, key, image, caption, where)


def _image_list_records(image_folder: str, image_list: str) -> Iterator[ImageRecord]:
    with open(image_list, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            rel = line.strip()
            if not rel or rel.startswith("#"):
                continue
            yield _folder_record(image_folder, rel, rel, None, f"{image_list}:{lineno}")


def _folder_record(image_folder: str, key: str, rel: str, caption: Optional[str], where: str) -> ImageRecord:
    path = os.path.join(image_folder, rel)
    if not os.path.isfile(path):
        return ImageRecord(key, f"{where} ({path})", path=path, caption=caption,
                           problem=(SKIP_MISSING, f"no such file: {path}"))
    return ImageRecord(key, f"{where} ({path})", path=path,
                       caption=caption.strip() if caption is not None else None)


def count_folder_records(jsonl: Optional[str] = None, image_list: Optional[str] = None) -> int:
    """Number of records (non-blank lines) of a JSONL file or an image list, for progress bars."""
    path = jsonl or image_list
    n = 0
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            s = line.strip()
            if s and not (image_list and s.startswith("#")):
                n += 1
    return n


def iter_folder_records(image_folder: str, jsonl: Optional[str] = None,
                        image_list: Optional[str] = None) -> Iterator[ImageRecord]:
    """Records of an image folder with a JSONL file (``{"key", "image", "caption"}``, ``key``
    defaulting to ``image``; ``caption`` optional) or an image list (one relative path a line,
    the path being the key; no captions). A malformed JSONL line raises ValueError naming the
    file, the line and the field; a missing image file gives a record marked missing."""
    if (jsonl is None) == (image_list is None):
        raise ValueError("give exactly one of a JSONL file or an image list with an image folder")
    if not os.path.isdir(image_folder):
        raise FileNotFoundError(f"--image-folder {image_folder}: no such directory")
    src = jsonl or image_list
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{'--jsonl' if jsonl else '--image-list'} {src}: no such file")
    if jsonl is not None:
        return _jsonl_records(image_folder, jsonl)
    return _image_list_records(image_folder, image_list)
