"""Runs the data tools end to end on ShapesWorld: raw files -> shards a blend can train on.

The quickstart and the end-to-end test use it; every step runs the real command-line tool as a
user would (and prints the command), so what works here works on real data:

1. ``tools/make_synthetic_data.py``: ShapesWorld raw files (webdataset caption shards, a LLaVA
   JSON with images, a text corpus, a tokenizer, evaluation files);
2. ``tools/preprocess_text.py``: the corpus to megatron IndexedDataset shards;
3. ``tools/precompute_image_embeddings.py``: caption images to caption shards (the recipe's
   frozen encoder);
4. ``tools/preprocess_llava.py``: conversations to instruction shards (+ images.txt);
5. ``tools/precompute_image_embeddings.py``: the conversations' images to embedding shards;
6. ``tools/precompute_image_embeddings.py``: the evaluation images to embedding shards (keys: the
   file names, as the evaluation tasks name them), for ``tools/evaluate_vlm.py``.

With ``image_shards=True`` (or later through :func:`prepare_image_shards`) two more steps store
the caption images and the conversations' images as image shards
(``tools/precompute_image_embeddings.py --store images``) under ``shards/online/``, the data of
``model.encoder.mode=online`` (:meth:`PreparedData.online_overrides`). They are off by default:
the quickstart trains with precomputed embeddings only, and the two extra tool runs would slow
it down.

Each tool resumes, so running the pipeline again on a finished directory redoes nothing.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEPARATOR = "<|sep|>"


@dataclass(frozen=True)
class PreparedData:
    """Where the prepared shards are (the ``data.*`` config values)."""

    raw: Path
    tokenizer: Path
    text: Path
    captions: Path
    instructions: Path
    instruction_images: Path
    eval_images: Path

    @classmethod
    def at(cls, root: str | os.PathLike) -> "PreparedData":
        """Where :func:`prepare_shapesworld` puts everything under ``root``."""
        root = Path(root)
        raw, shards = root / "raw", root / "shards"
        return cls(raw=raw, tokenizer=raw / "tokenizer" / "tokenizer.json",
                   text=shards / "text" / "corpus", captions=shards / "captions",
                   instructions=shards / "instructions",
                   instruction_images=shards / "instruction_images",
                   eval_images=shards / "eval_images")

    @property
    def online_captions(self) -> Path:
        """Image shards of the caption pairs (``data.captions`` for an online encoder)."""
        return self.captions.parent / "online" / "captions"

    @property
    def online_instruction_images(self) -> Path:
        """Image shards of the conversations' images (``data.instruction_images`` online)."""
        return self.captions.parent / "online" / "instruction_images"

    def online_overrides(self) -> list[str]:
        """:meth:`overrides` with the image sources replaced by the image shards that
        :func:`prepare_image_shards` writes: the data of a run with
        ``model.encoder.mode=online`` (which the caller sets)."""
        online = {"data.captions": self.online_captions,
                  "data.instruction_images": self.online_instruction_images}
        return [f"{key}={online[key]}" if key in online else f"{key}={value}"
                for key, value in (item.split("=", 1) for item in self.overrides())]

    def overrides(self) -> list[str]:
        """``key=value`` overrides pointing a config at these shards."""
        return [f"data.tokenizer={self.tokenizer}", f"data.text={self.text}",
                f"data.captions={self.captions}", f"data.instructions={self.instructions}",
                f"data.instruction_images={self.instruction_images}",
                f"data.separator_token={SEPARATOR}",
                # What tools/evaluate_vlm.py --suite shapesworld reads (recorded in checkpoints).
                f"evaluation.data_root={self.raw}", f"evaluation.text_tasks={self.raw}/text/tasks",
                f"evaluation.image_embeddings={self.eval_images}"]


class ToolFailed(ValueError):
    """A data tool exited with an error (a ValueError, so entry points print it as one line:
    the tool itself has printed the reason, or its traceback for an internal error)."""


def _run(tool: str, args: list[str], quiet: bool) -> None:
    cmd = [sys.executable, str(REPO / "tools" / tool), *args]
    if not quiet:
        print("$ " + " ".join(shlex.quote(c) for c in [f"tools/{tool}", *args]), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run(cmd, env=env, text=True,
                          stdout=subprocess.PIPE if quiet else None,
                          stderr=subprocess.STDOUT if quiet else None)
    if proc.returncode:
        # The tool has said why (above, or in its output here when quiet): one line more.
        raise ToolFailed(f"tools/{tool} failed with status {proc.returncode}"
                         + (f":\n{proc.stdout[-3000:]}" if quiet else " (its output is above)"))


def prepare_shapesworld(root: str | os.PathLike, recipe: str = "tiny", overrides=(),
                        images: int = 192, text_docs: int = 1500, seed: int = 0,
                        quiet: bool = False, image_shards: bool = False, max_shapes: int = 4,
                        llava_max_turns: int = 2, eval_images: int = 64) -> PreparedData:
    """Makes ShapesWorld under ``root/raw`` and its shards under ``root/shards``.

    ``recipe`` and ``overrides`` choose the frozen encoder (``model.encoder``) that embeds the
    images and the sequence length used in preprocessing summaries; its weights are random
    unless ``model.encoder.weights_path`` is given. ``images`` is the number of caption pairs
    and of images with conversations (``llava_max_turns`` question/answer pairs at most),
    ``max_shapes`` the most shapes in one image, ``eval_images`` the images behind the
    evaluation files (tools/make_synthetic_data.py). ``image_shards`` also writes the image
    shards of :func:`prepare_image_shards`.
    """
    from megatron_vlm.config import load_config

    cfg = load_config(recipe, list(overrides))
    enc = cfg.model.encoder
    paths = PreparedData.at(root)
    raw, shards, tokenizer = paths.raw, paths.raw.parent / "shards", paths.tokenizer
    progress = ["--no-progress"] if quiet else []
    encoder_args = ["--recipe", recipe, *overrides]
    if enc.weights_path is None:
        encoder_args.append("--allow-random-weights")

    _run("make_synthetic_data.py", ["--out", str(raw), "--seed", str(seed), "--images",
                                    str(images), "--size", str(enc.image_size), "--text-docs",
                                    str(text_docs), "--llava-max-turns", str(llava_max_turns),
                                    "--max-shapes", str(max_shapes), "--eval-images",
                                    str(eval_images), *progress], quiet)
    _run("preprocess_text.py", ["--input", str(raw / "text" / "corpus.jsonl"), "--tokenizer",
                                str(tokenizer), "--output-prefix", str(shards / "text" / "corpus"),
                                *progress], quiet)
    _run("precompute_image_embeddings.py", [*encoder_args, "--tar", str(raw / "captions"),
                                            "--tokenizer", str(tokenizer), "--output",
                                            str(shards / "captions"), *progress], quiet)
    _run("preprocess_llava.py", ["--input", str(raw / "llava" / "llava_instruct.json"),
                                 "--image-root", str(raw / "llava" / "images"), "--tokenizer",
                                 str(tokenizer), "--output-dir", str(shards / "instructions"),
                                 "--separator-token", SEPARATOR, "--seq-length",
                                 str(cfg.train.seq_length), "--num-image-tokens",
                                 str(enc.num_image_tokens), *progress], quiet)
    _run("precompute_image_embeddings.py", [*encoder_args, "--image-folder",
                                            str(raw / "llava" / "images"), "--image-list",
                                            str(shards / "instructions" / "images.txt"),
                                            "--output", str(shards / "instruction_images"),
                                            *progress], quiet)
    eval_list = shards / "eval_images.txt"
    names = sorted(os.listdir(raw / "eval" / "images"))
    eval_list.write_text("".join(name + "\n" for name in names))
    _run("precompute_image_embeddings.py", [*encoder_args, "--image-folder",
                                            str(raw / "eval" / "images"), "--image-list",
                                            str(eval_list), "--output", str(paths.eval_images),
                                            *progress], quiet)
    if image_shards:
        prepare_image_shards(root, recipe, overrides, quiet=quiet)
    return PreparedData.at(root)


def prepare_image_shards(root: str | os.PathLike, recipe: str = "tiny", overrides=(),
                         quiet: bool = False) -> PreparedData:
    """Stores the caption images and the conversations' images of a prepared ShapesWorld
    (:func:`prepare_shapesworld` ran on ``root`` before) as image shards, for
    ``model.encoder.mode=online``: :attr:`PreparedData.online_captions` and
    :attr:`PreparedData.online_instruction_images`, resized (when loaded) in the default
    letterbox mode like the embeddings. ``recipe`` gives the image size of the decode check."""
    paths = PreparedData.at(root)
    shards = paths.raw.parent / "shards"
    common = ["--recipe", recipe, *overrides, "--store", "images",
              *(["--no-progress"] if quiet else [])]
    _run("precompute_image_embeddings.py", [*common, "--tar", str(paths.raw / "captions"),
                                            "--tokenizer", str(paths.tokenizer), "--output",
                                            str(paths.online_captions)], quiet)
    _run("precompute_image_embeddings.py", [*common, "--image-folder",
                                            str(paths.raw / "llava" / "images"), "--image-list",
                                            str(shards / "instructions" / "images.txt"),
                                            "--output", str(paths.online_instruction_images)],
         quiet)
    return paths


def main(argv=None) -> int:
    """``python -m megatron_vlm.data.prepare ROOT [options] [key=value ...]``."""
    from megatron_vlm.cli import OverridesParser

    parser = OverridesParser(
        prog="python -m megatron_vlm.data.prepare",
        description="Runs the data tools on ShapesWorld: raw files under ROOT/raw, shards a "
                    "blend trains on under ROOT/shards (each tool's command is printed; a rerun "
                    "on a finished directory redoes nothing).")
    parser.add_argument("root", help="output directory")
    parser.add_overrides("config overrides choosing the frozen encoder that embeds the images "
                         "(model.encoder.*), as for --recipe")
    parser.add_argument("--recipe", default="tiny", help="recipe of the encoder (default tiny)")
    parser.add_argument("--images", type=int, default=192,
                        help="caption pairs, and images with conversations (default 192)")
    parser.add_argument("--max-shapes", type=int, default=4,
                        help="most shapes in one image (default 4)")
    parser.add_argument("--llava-max-turns", type=int, default=2,
                        help="most question/answer pairs per conversation (default 2)")
    parser.add_argument("--eval-images", type=int, default=64,
                        help="images behind the evaluation files (default 64)")
    parser.add_argument("--text-docs", type=int, default=1500,
                        help="documents in the text corpus (default 1500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world (default 0)")
    parser.add_argument("--image-shards", action="store_true",
                        help="also store the images as image shards (model.encoder.mode=online)")
    parser.add_argument("--quiet", action="store_true",
                        help="print nothing unless a tool fails (then its output)")
    args = parser.parse_args(argv)
    prepare_shapesworld(args.root, args.recipe, args.overrides, images=args.images,
                        text_docs=args.text_docs, seed=args.seed, quiet=args.quiet,
                        image_shards=args.image_shards, max_shapes=args.max_shapes,
                        llava_max_turns=args.llava_max_turns, eval_images=args.eval_images)
    return 0


if __name__ == "__main__":
    from megatron_vlm.cli import run_main

    run_main(main, "prepare")
