"""Writes a whole ShapesWorld data set to a directory (see docs/synthetic.md for the layout).

Three disjoint image sets are drawn: caption pairs (``cap-NNNNNN``), LLaVA conversation images
(``llava-NNNNNN``) and evaluation images (``eval-NNNNNN``). Every file is written to a
temporary name, flushed to disk and renamed into place; ``manifest.json`` is written last and
lists the SHA-256 of every file. A run into a directory that already holds a complete data set
of the same configuration verifies it and stops; an interrupted run (marked by
``.shapesworld-incomplete``) is simply redone, since a full run takes seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from megatron_vlm.synthetic.conversations import image_conversation, text_conversation
from megatron_vlm.synthetic.evals import (POPE_SPLITS, build_pope, build_refcoco, build_vqav2,
                                          eval_image_name)
from megatron_vlm.synthetic.language import caption
from megatron_vlm.synthetic.scenes import Scene, World, jpeg_bytes, render
from megatron_vlm.synthetic.text import TASKS, corpus_document, task_yaml
from megatron_vlm.synthetic.tokenizer import train_bpe, train_sentencepiece

FORMAT = "shapesworld"
VERSION = 1
MARKER = ".shapesworld-incomplete"
OWNED = ("captions", "captions_folder", "llava", "eval", "text", "tokenizer", "scenes.jsonl",
         "manifest.json")
"""Top-level entries a (re)generation replaces; nothing else in the directory is touched."""


@dataclass
class ShapesWorldConfig:
    """What to generate; every field is a command-line option of tools/make_synthetic_data.py."""

    seed: int = 0
    "seed of the world: same seed and options give byte-identical files"
    images: int = 256
    "image-caption pairs (webdataset shards and folder+JSONL)"
    llava_images: int | None = None
    "images with LLaVA conversations (default: same as images)"
    llava_text_fraction: float = 0.1
    "text-only LLaVA conversations, as a fraction of llava_images"
    llava_max_turns: int = 4
    "most question/answer pairs per image conversation (text-only ones: at most 3)"
    eval_images: int = 64
    "images behind the VQAv2, POPE and RefCOCO files"
    size: int = 64
    "image width and height in pixels"
    min_shapes: int = 1
    "fewest shapes per image"
    max_shapes: int = 4
    "most shapes per image"
    vqa_per_image: int = 3
    "VQAv2 questions per eval image"
    pope_per_image: int = 3
    "POPE yes questions per eval image and split (as many no questions; fewer when fewer kinds)"
    text_docs: int = 2000
    "documents in the text corpus"
    task_items: int = 200
    "items per multiple-choice text task"
    vocab_size: int = 512
    "tokenizer vocabulary size (both tokenizers)"
    sentencepiece: bool = True
    "also train tokenizer/tokenizer.model (sentencepiece)"
    shard_size: int = 128
    "samples per caption tar shard"
    jpeg_quality: int = 90
    "JPEG quality of every image"
    corrupt: int = 0
    "deliberately broken caption/LLaVA items (alternately truncated JPEG, missing file)"

    def __post_init__(self) -> None:
        if self.llava_images is None:
            self.llava_images = self.images
        for name in ("images", "llava_images", "eval_images", "text_docs", "task_items", "corrupt"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("vqa_per_image", "pope_per_image", "shard_size", "llava_max_turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.llava_text_fraction <= 10.0:
            raise ValueError(f"llava_text_fraction={self.llava_text_fraction} must be in [0, 10]")
        if not 16 <= self.size <= 4096:
            raise ValueError(f"size={self.size} must be in [16, 4096] pixels")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality} must be in [1, 100]")
        if self.images + self.llava_images + self.text_docs == 0:
            raise ValueError("nothing to train the tokenizer on: images, llava_images and "
                             "text_docs are all 0")
        World(self.seed, self.min_shapes, self.max_shapes)  # validates the shape counts

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Field name -> its docstring (read from the source, for --help)."""
        import ast
        import inspect

        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        docs = {}
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
                    and isinstance(getattr(b, "value", None), ast.Constant)):
                docs[a.target.id] = b.value.value
        return docs


@dataclass
class _Writer:
    """Atomic file writes under ``root`` (temporary name, then rename), remembering each file's
    SHA-256. Data files are not flushed one by one: :meth:`sync` flushes them all before the
    manifest, the only file whose presence says the data set is complete, is written with
    ``fsync=True``."""

    root: Path
    files: dict[str, str] = field(default_factory=dict)

    def write(self, rel: str, data: bytes | str, fsync: bool = False) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        self.files[rel] = hashlib.sha256(data).hexdigest()

    @staticmethod
    def sync() -> None:
        if hasattr(os, "sync"):
            os.sync()


def _jsonl(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _json(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    """A tar archive with fixed metadata (mtime 0, root owner, mode 644): same bytes every run."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(out_dir: str | os.PathLike) -> list[str]:
    """Files of a generated directory whose SHA-256 differs from its manifest (or are missing)."""
    root = Path(out_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    bad = []
    for rel, digest in manifest["files"].items():
        p = root / rel
        if not p.is_file() or _sha256(p) != digest:
            bad.append(rel)
    return bad


def _prepare(root: Path, cfg: ShapesWorldConfig, force: bool) -> dict | None:
    """Returns the existing manifest when ``root`` already holds this exact data set, else
    clears ShapesWorld's own entries from it (refusing a foreign non-empty directory)."""
    manifest_path = root / "manifest.json"
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out {root} exists and is not a directory")
    if manifest_path.is_file() and not (root / MARKER).exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{manifest_path}: not valid JSON ({err}); "
                             f"remove it or pass --force") from None
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path} is not a ShapesWorld manifest; choose another --out")
        if not force and manifest.get("config") == asdict(cfg) and not verify(root) \
                and _task_paths_ok(root, manifest):
            return manifest
    elif root.is_dir() and any(root.iterdir()) and not (root / MARKER).exists() and not force:
        raise ValueError(f"--out {root} is not empty and holds no ShapesWorld data set; choose an "
                         f"empty or new directory, or pass --force to write into it anyway")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("generation in progress\n")
    for name in OWNED:
        p = root / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    return None


def _task_paths_ok(root: Path, manifest: dict) -> bool:
    """Task YAMLs hold absolute data paths: a moved directory must be regenerated."""
    return all(Path(t["data_abs"]) == (root / t["data"]).resolve()
               for t in manifest.get("text_tasks", {}).values())


def generate(out_dir: str | os.PathLike, cfg: ShapesWorldConfig | None = None, *,
             progress: bool = True, force: bool = False, fsync: bool = True) -> dict:
    """Generates the data set into ``out_dir`` and returns a summary (the manifest plus
    ``seconds`` per stage and ``skipped``: whether an identical complete data set was already
    there). ``fsync``: flush every file to disk before the manifest is written (off only where
    durability does not matter, e.g. scratch directories)."""
    from megatron_vlm.progress import Progress

    cfg = cfg or ShapesWorldConfig()
    root = Path(out_dir)
    t0 = time.perf_counter()
    existing = _prepare(root, cfg, force)
    if existing is not None:
        return {**existing, "skipped": True, "seconds": {"total": time.perf_counter() - t0}}

    world = World(cfg.seed, cfg.min_shapes, cfg.max_shapes)
    w = _Writer(root)
    seconds: dict[str, float] = {}
    n_images = cfg.images + cfg.llava_images + cfg.eval_images + cfg.corrupt
    bar = Progress(n_images + cfg.text_docs, "shapesworld", "item", enabled=progress)
    scene_records: list[dict] = []
    tokenizer_texts: list[str] = []
    corrupt: list[dict] = []

    def draw(part: str, i: int, key: str) -> tuple[Scene, bytes]:
        scene = world.sample_scene(key, cfg.size, world.rng(part, i))
        return scene, jpeg_bytes(render(scene), cfg.jpeg_quality)

    def corrupt_item(i: int) -> tuple[Scene, bytes | None, str]:
        kind = "truncated" if i % 2 == 0 else "missing"
        scene, data = draw("corrupt", i, f"corrupt-{i:06d}")
        return scene, (data[: len(data) // 2] if kind == "truncated" else None), kind

    # ---- caption pairs: tar shards + folder/JSONL, corrupt items spread among them --------
    t = time.perf_counter()
    cap_corrupt_at: dict[int, list[int]] = {}  # caption index -> corrupt items placed before it
    for j in range(cfg.corrupt):
        cap_corrupt_at.setdefault(((j + 1) * cfg.images) // (cfg.corrupt + 1), []).append(j)
    shard: list[tuple[str, bytes]] = []
    shard_names: list[str] = []
    folder_lines: list[dict] = []
    n_in_shard = 0

    def flush_shard() -> None:
        nonlocal shard, n_in_shard
        if shard:
            name = f"captions/shard-{len(shard_names):05d}.tar"
            w.write(name, _tar(shard))
            shard_names.append(name)
        shard, n_in_shard = [], 0

    def add_pair(key: str, scene: Scene, data: bytes | None, text: str) -> None:
        nonlocal n_in_shard
        meta = {"key": key, "caption": text, "width": scene.width, "height": scene.height}
        if data is not None:
            shard.append((f"{key}.jpg", data))
            w.write(f"captions_folder/images/{key}.jpg", data)
        shard.append((f"{key}.txt", text.encode("utf-8")))
        shard.append((f"{key}.json", json.dumps(meta).encode("utf-8")))
        folder_lines.append({"key": key, "image": f"images/{key}.jpg", "caption": text})
        n_in_shard += 1
        if n_in_shard >= cfg.shard_size:
            flush_shard()

    def add_corrupt_pair(j: int) -> None:
        scene, data, kind = corrupt_item(j)
        text = caption(scene, world.rng("corrupt-caption", j))
        files = [f"captions/shard-{len(shard_names):05d}.tar", "captions_folder/captions.jsonl"]
        add_pair(scene.key, scene, data, text)
        corrupt.append({"key": scene.key, "kind": kind, "set": "captions",
                        "image": f"captions_folder/images/{scene.key}.jpg", "in": files})
        bar.update(1)

    for i in range(cfg.images):
        for j in cap_corrupt_at.get(i, ()):
            add_corrupt_pair(j)
        key = f"cap-{i:06d}"
        scene, data = draw("cap", i, key)
        text = caption(scene, world.rng("cap-caption", i))
        add_pair(key, scene, data, text)
        scene_records.append(scene.to_record(f"captions_folder/images/{key}.jpg", set="captions",
                                             caption=text))
        tokenizer_texts.append(text)
        bar.update(1)
    for j in cap_corrupt_at.get(cfg.images, ()):  # only when images == 0
        add_corrupt_pair(j)
    flush_shard()
    w.write("captions_folder/captions.jsonl", _jsonl(folder_lines))
    seconds["captions"] = time.perf_counter() - t

    # ---- LLaVA conversations --------------------------------------------------------------
    t = time.perf_counter()
    llava: list[dict] = []
    llava_index: list[dict] = []
    for i in range(cfg.llava_images):
        key = f"llava-{i:06d}"
        scene, data = draw("llava", i, key)
        rel = f"shapes/{key}.jpg"
        w.write(f"llava/images/{rel}", data)
        llava.append({"id": key, "image": rel,
                      "conversations": image_conversation(scene, world.rng("llava-conv", i),
                                                         cfg.llava_max_turns)})
        text = caption(scene, world.rng("llava-caption", i))
        llava_index.append({"key": key, "image": f"images/{rel}", "caption": text})
        scene_records.append(scene.to_record(f"llava/images/{rel}", set="llava", caption=text))
        bar.update(1)
    n_text_only = int(round(cfg.llava_images * cfg.llava_text_fraction))
    for i in range(n_text_only):
        llava.append({"id": f"text-{i:06d}",
                      "conversations": text_conversation(world.rng("llava-text", i))})
    world.rng("llava-order", 0).shuffle(llava)
    # corrupt LLaVA items (the same broken scenes as the caption set, under their own files)
    for j in range(cfg.corrupt):
        scene, data, kind = corrupt_item(j)
        rel = f"shapes/{scene.key}.jpg"
        if data is not None:
            w.write(f"llava/images/{rel}", data)
        pos = ((j + 1) * len(llava)) // (cfg.corrupt + 1)
        conv = image_conversation(scene, world.rng("corrupt-conv", j), cfg.llava_max_turns)
        llava.insert(pos, {"id": scene.key, "image": rel, "conversations": conv})
        llava_index.append({"key": scene.key, "image": f"images/{rel}",
                            "caption": caption(scene, world.rng("corrupt-caption", j))})
        corrupt.append({"key": scene.key, "kind": kind, "set": "llava",
                        "image": f"llava/images/{rel}",
                        "in": ["llava/llava_instruct.json", "llava/images.jsonl"]})
    w.write("llava/llava_instruct.json", _json(llava))
    w.write("llava/images.jsonl", _jsonl(llava_index))
    for rec in llava:
        tokenizer_texts.extend(t["value"].replace("<image>\n", "") for t in rec["conversations"])
    seconds["llava"] = time.perf_counter() - t

    # ---- evaluation sets -------------------------------------------------------------------
    t = time.perf_counter()
    eval_scenes: list[Scene] = []
    eval_index: list[dict] = []
    for i in range(cfg.eval_images):
        name = eval_image_name(i)
        scene, data = draw("eval", i, name[:-4])
        w.write(f"eval/images/{name}", data)
        eval_scenes.append(scene)
        text = caption(scene, world.rng("eval-caption", i))
        eval_index.append({"key": scene.key, "image": f"images/{name}", "caption": text})
        scene_records.append(scene.to_record(f"eval/images/{name}", set="eval", image_id=i,
                                             caption=text))
        bar.update(1)
    w.write("eval/images.jsonl", _jsonl(eval_index))
    questions, annotations = build_vqav2(world, eval_scenes, cfg.vqa_per_image)
    w.write("eval/vqav2/questions.json", _json(questions))
    w.write("eval/vqav2/annotations.json", _json(annotations))
    pope = build_pope(world, eval_scenes, cfg.pope_per_image)
    for split in POPE_SPLITS:
        w.write(f"eval/pope/{split}.jsonl", _jsonl(pope[split]))
    refcoco = build_refcoco(world, eval_scenes)
    w.write("eval/refcoco/val.jsonl", _jsonl(refcoco))
    tokenizer_texts.extend(q["question"] for q in questions["questions"])
    tokenizer_texts.extend(r["sent"] for r in refcoco)
    seconds["eval"] = time.perf_counter() - t

    # ---- text corpus and multiple-choice tasks ---------------------------------------------
    t = time.perf_counter()
    docs = []
    for i in range(cfg.text_docs):
        docs.append(corpus_document(world, i))
        if i % 256 == 255:
            bar.update(256)
    bar.update(cfg.text_docs % 256)
    w.write("text/corpus.jsonl", _jsonl({"text": d} for d in docs))
    tokenizer_texts.extend(docs)
    tasks_manifest: dict[str, dict] = {}
    task_data_abs: dict[str, str] = {}
    for name, (item, n_choices) in TASKS.items():
        items = [item(world, i) for i in range(cfg.task_items)]
        data_rel = f"text/tasks/{name}.jsonl"
        w.write(data_rel, _jsonl(items))
        data_abs = str((root / data_rel).resolve())
        w.write(f"text/tasks/{name}.yaml", task_yaml(name, data_abs))
        tokenizer_texts.extend(f"{it['query']} {it['choices'][it['gold']]}" for it in items)
        tasks_manifest[name] = {"yaml": f"text/tasks/{name}.yaml", "data": data_rel,
                                "items": len(items), "num_choices": n_choices,
                                "chance": round(1.0 / n_choices, 6)}
        task_data_abs[name] = data_abs
    w.write("text/tasks.json", _json({"tasks": tasks_manifest}))
    seconds["text"] = time.perf_counter() - t

    # ---- tokenizers -----------------------------------------------------------------------
    t = time.perf_counter()
    bar.set_note("tokenizer")
    w.write("tokenizer/tokenizer.json", train_bpe(tokenizer_texts, cfg.vocab_size))
    if cfg.sentencepiece:
        w.write("tokenizer/tokenizer.model", train_sentencepiece(tokenizer_texts, cfg.vocab_size))
    seconds["tokenizer"] = time.perf_counter() - t
    bar.close()

    # ---- scene records and manifest -------------------------------------------------------
    w.write("scenes.jsonl", _jsonl(scene_records))
    n_llava_img = sum(1 for r in llava if "image" in r)
    manifest = {
        "format": FORMAT, "version": VERSION, "seed": cfg.seed, "image_size": cfg.size,
        "config": asdict(cfg),
        "counts": {
            "caption_pairs": cfg.images, "caption_shards": len(shard_names),
            "llava_records": len(llava), "llava_image_records": n_llava_img,
            "llava_text_records": len(llava) - n_llava_img, "eval_images": cfg.eval_images,
            "vqav2_questions": len(questions["questions"]),
            **{f"pope_{s}": len(pope[s]) for s in POPE_SPLITS},
            "refcoco": len(refcoco), "text_docs": cfg.text_docs,
            **{f"task_{n}": v["items"] for n, v in tasks_manifest.items()},
            "vocab_size": cfg.vocab_size, "corrupt": len(corrupt),
        },
        "paths": {
            "scenes": "scenes.jsonl",
            "caption_shards": shard_names,
            "captions_folder": "captions_folder",
            "captions_jsonl": "captions_folder/captions.jsonl",
            "llava_json": "llava/llava_instruct.json", "llava_images": "llava/images",
            "llava_images_jsonl": "llava/images.jsonl",
            "eval_images": "eval/images", "eval_images_jsonl": "eval/images.jsonl",
            "vqav2_questions": "eval/vqav2/questions.json",
            "vqav2_annotations": "eval/vqav2/annotations.json",
            "pope": {s: f"eval/pope/{s}.jsonl" for s in POPE_SPLITS},
            "refcoco": "eval/refcoco/val.jsonl",
            "text_corpus": "text/corpus.jsonl", "text_tasks_dir": "text/tasks",
            "text_tasks_manifest": "text/tasks.json",
            "tokenizer": "tokenizer/tokenizer.json",
            **({"sentencepiece": "tokenizer/tokenizer.model"} if cfg.sentencepiece else {}),
        },
        "special_tokens": {"eos": {"token": "<|endoftext|>", "id": 0},
                           "separator": {"token": "<|sep|>", "id": 1}},
        "text_tasks": {n: {**v, "data_abs": task_data_abs[n]} for n, v in tasks_manifest.items()},
        "corrupt": corrupt,
        "files": dict(sorted(w.files.items())),
    }
    if fsync:
        w.sync()
    w.write("manifest.json", _json(manifest), fsync=fsync)
    (root / MARKER).unlink()
    seconds["total"] = time.perf_counter() - t0
    return {**manifest, "skipped": False, "seconds": seconds}


def config_fields() -> list[str]:
    return [f.name for f in fields(ShapesWorldConfig)]
