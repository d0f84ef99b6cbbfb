#!/usr/bin/env python
"""Precompute frozen vision-encoder patch embeddings of image-caption pairs into caption shards,
or (--store images) store the images themselves for training with an online encoder.

Inputs, processed in a fixed order:
  --tar PATH ...                       webdataset tar shards in the DataComp layout (KEY.jpg/.png
                                       with KEY.txt and/or KEY.json captions); a directory stands
                                       for its *.tar files, sorted
  --image-folder DIR --jsonl FILE      records {"key", "image", "caption"} ("image" relative to
                                       DIR; "key" defaults to "image"; "caption" optional)
  --image-folder DIR --image-list FILE one relative image path a line (the path is the key; no
                                       captions), e.g. the images of an instruction set

--store embeddings (default): images are decoded and resized with DALI (on the GPU when there
is one, DALI's CPU mode otherwise), normalized with the encoder's mean/std, and run through the
encoder of the recipe (model.encoder: open_clip_model, custom_vision_cfg, image_size,
weights_path) in eval mode without gradients (bf16 autocast on a GPU). Output: an embedding-shard
directory (index.json, shard_*), for model.encoder.mode=precomputed.

--store images: no encoder runs. Every image is decoded and resized the same way only to skip
the ones that cannot be; the others are stored as they were read (the encoded file) with their
caption tokens in an image-shard directory, for model.encoder.mode=online: the training loader
decodes them again, resizing with the --resize mode recorded here, for the encoder of the run
(the shards do not depend on the encoder or its image size).

Both write precompute.json (the settings; for images the resize mode the loader and the
evaluation use) and skipped.jsonl (every skipped key with its reason).

Corrupt or missing images are skipped and listed; more than --max-skips stop the run with an
error naming the last key. A tar that is cut short (also exactly at a member boundary, where
only its end-of-archive blocks are missing) or damaged stops the run with an error naming it.
An interrupted run resumes: finished shards are kept, their keys are not processed again, and
the remaining shards come out as an uninterrupted run writes them. --output must be new, empty,
or the output of an earlier run with the same settings and the same inputs (paths, in order);
anything else is refused, so rows are never appended to other data.

Examples:
  python tools/precompute_image_embeddings.py --recipe 1b model.encoder.weights_path=siglip.safetensors \\
      --tar /data/datacomp/shards --tokenizer tokenizer.json --output /data/emb/datacomp
  python tools/precompute_image_embeddings.py --recipe 1b --store images \\
      --tar /data/datacomp/shards --tokenizer tokenizer.json --output /data/images/datacomp
"""

from megatron_vlm.logs import configure_logging

import os
from typing import List, Optional

from megatron_vlm.cli import run_main

PROG = "precompute_image_embeddings"
STORES = ("embeddings", "images")


def build_parser():
    from megatron_vlm.config import RESIZE_MODES, config_arg_parser
    from megatron_vlm.data.dali_pipeline import DECODERS, DEVICES

    p = config_arg_parser(__doc__, prog=PROG)
    src = p.add_argument_group("inputs")
    src.add_argument("--tar", nargs="+", metavar="PATH",
                     help="webdataset .tar shards, or directories of them (processed in the order "
                          "given, directories sorted)")
    src.add_argument("--image-folder", metavar="DIR",
                     help="folder the --jsonl / --image-list paths are relative to (default: the "
                          "folder of the --jsonl file)")
    src.add_argument("--jsonl", metavar="FILE", help='records {"key", "image", "caption"}, one per line')
    src.add_argument("--image-list", metavar="FILE", help="relative image paths, one per line (keys = paths)")
    out = p.add_argument_group("output")
    out.add_argument("--store", choices=STORES, default="embeddings",
                     help="embeddings: the frozen encoder's outputs (model.encoder.mode="
                          "precomputed); images: the encoded images themselves, for an online "
                          "encoder (model.encoder.mode=online) (default: %(default)s)")
    out.add_argument("--output", required=True, metavar="DIR",
                     help="embedding-shard (or, with --store images, image-shard) directory to write")
    out.add_argument("--tokenizer", metavar="PATH",
                     help="tokenizer.json or sentencepiece .model; captions are stored tokenized "
                          "(without it no caption tokens are stored)")
    out.add_argument("--dtype", choices=("bf16", "fp8"), default=None,
                     help="stored embedding type, --store embeddings only (default: bf16)")
    out.add_argument("--rows-per-shard", type=int, default=4096, metavar="N",
                     help="images per output shard (default: %(default)s)")
    run = p.add_argument_group("processing")
    run.add_argument("--resize", choices=RESIZE_MODES, default="letterbox",
                     help="letterbox: pad to a square with the mean colour, then resize; "
                          "resize-naive: stretch; resize-crop: shorter side to the image size, "
                          "then centre crop; with --store images, the mode the training loader "
                          "will resize with (default: %(default)s)")
    run.add_argument("--batch-size", type=int, default=64, metavar="N",
                     help="images per decode and encoder batch (default: %(default)s)")
    run.add_argument("--device", choices=DEVICES, default="auto",
                     help="where decoding and the encoder run; auto = CUDA if available "
                          "(default: %(default)s)")
    run.add_argument("--decoder", choices=DECODERS, default="dali",
                     help="dali (default), or pil: the pure-PIL reference path")
    run.add_argument("--num-threads", type=int, default=None, metavar="N",
                     help="DALI CPU threads (default: CPU count, at most 8)")
    run.add_argument("--max-skips", type=int, default=0, metavar="N",
                     help="corrupt, unreadable or missing images to skip and list before stopping "
                          "with an error (default: %(default)s; web-scraped sets need a limit)")
    run.add_argument("--allow-random-weights", action="store_true",
                     help="run a randomly initialized encoder when model.encoder.weights_path is "
                          "null (for tests only: the embeddings are meaningless); not needed "
                          "with --store images")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def parse_args(argv: Optional[List[str]] = None):
    p = build_parser()
    # An override after --tar's paths is not one of them (config_arg_parser takes it out).
    args = p.parse_intermixed_args(argv)
    folder_mode = args.jsonl is not None or args.image_list is not None
    if bool(args.tar) == folder_mode:
        p.error("give either --tar PATH... or --jsonl FILE / --image-list FILE (with --image-folder)")
    if args.jsonl is not None and args.image_list is not None:
        p.error("give only one of --jsonl and --image-list")
    if args.image_list is not None and args.image_folder is None:
        p.error("--image-list needs --image-folder")
    if args.image_folder is not None and not folder_mode:
        p.error("--image-folder goes with --jsonl or --image-list")
    for name in ("batch_size", "rows_per_shard"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_skips < 0:
        p.error("--max-skips must be >= 0")
    if args.store == "images" and args.dtype is not None:
        p.error("--dtype applies to --store embeddings (images are stored as they were read)")
    args.dtype = args.dtype or "bf16"
    return args


def _records(args):
    """(records callable, input paths, record count or None) of the inputs the flags name."""
    from megatron_vlm.data.image_sources import (
        count_folder_records,
        expand_tar_inputs,
        iter_folder_records,
        iter_tar_records,
    )

    if args.tar:
        inputs = [os.path.abspath(t) for t in expand_tar_inputs(args.tar)]
        return (lambda done: iter_tar_records(inputs, skip_keys=done)), inputs, None
    folder = args.image_folder or os.path.dirname(os.path.abspath(args.jsonl))
    inputs = [os.path.abspath(args.jsonl or args.image_list)]
    records = lambda done: iter_folder_records(folder, jsonl=args.jsonl,  # noqa: E731
                                               image_list=args.image_list)
    return records, inputs, count_folder_records(args.jsonl, args.image_list)


def _embed(args, cfg, pre, norm, records, inputs, total, tokenizer, log):
    """--store embeddings: the recipe's frozen encoder over the preprocessed images."""
    import torch

    from megatron_vlm.config import config_to_dict
    from megatron_vlm.data.precompute import precompute_embeddings
    from megatron_vlm.model.vision_encoder import build_vision_encoder

    enc_cfg = cfg.model.encoder
    if enc_cfg.weights_path is None and not args.allow_random_weights:
        raise ValueError("model.encoder.weights_path is null: the encoder would be randomly initialized "
                         "and its embeddings meaningless. Set model.encoder.weights_path=FILE (a local "
                         "open_clip/SigLIP weights file), or pass --allow-random-weights for tests")
    torch.manual_seed(cfg.seed)  # a random-init encoder (tests) is the same in every run
    encoder = build_vision_encoder(enc_cfg)
    encoder.set_frozen(True)
    encoder.eval()
    encoder.to(pre.device)

    encoder_dict = config_to_dict(cfg)["model"]["encoder"]
    weights = enc_cfg.weights_path
    settings = {
        "open_clip_model": enc_cfg.open_clip_model,
        "custom_vision_cfg": encoder_dict.get("custom_vision_cfg"),
        "image_size": enc_cfg.image_size,
        "n_img": enc_cfg.num_image_tokens,
        "d_enc": enc_cfg.embed_dim,
        "weights_path": os.path.abspath(weights) if weights else None,
        "weights_bytes": os.path.getsize(weights) if weights and os.path.isfile(weights) else None,
        "resize": args.resize,
        "normalization": norm.as_dict(),
        "dtype": args.dtype,
        "rows_per_shard": args.rows_per_shard,
        "tokenizer": os.path.abspath(args.tokenizer) if args.tokenizer else None,
        "inputs": inputs,
    }
    log.info("%s: %s -> %s (embeddings, %s, %s, batch %d)", PROG, _shown(inputs), args.output,
             args.resize, args.dtype, args.batch_size)
    try:
        return precompute_embeddings(
            records, encoder=encoder, preprocessor=pre, output_dir=args.output,
            n_img=enc_cfg.num_image_tokens, d_enc=enc_cfg.embed_dim, tokenizer=tokenizer,
            dtype=args.dtype, rows_per_shard=args.rows_per_shard, max_skips=args.max_skips,
            settings=settings, total=total, progress=not args.no_progress)
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def _store(args, pre, records, inputs, total, tokenizer, log):
    """--store images: the decodable images, as read, with their captions."""
    from megatron_vlm.data.precompute import store_images

    # No encoder setting: the shards serve any encoder. "resize" is what the loader and the
    # evaluation read back (settings.resize).
    settings = {
        "store": "images",
        "resize": args.resize,
        "rows_per_shard": args.rows_per_shard,
        "tokenizer": os.path.abspath(args.tokenizer) if args.tokenizer else None,
        "inputs": inputs,
    }
    log.info("%s: %s -> %s (images, loaded with %s, decode check in batches of %d)", PROG,
             _shown(inputs), args.output, args.resize, args.batch_size)
    return store_images(records, preprocessor=pre, output_dir=args.output, tokenizer=tokenizer,
                        rows_per_shard=args.rows_per_shard, max_skips=args.max_skips,
                        settings=settings, total=total, progress=not args.no_progress)


def _shown(inputs: List[str]) -> str:
    return ", ".join(inputs[:3]) + (" ..." if len(inputs) > 3 else "")


def main(argv: Optional[List[str]] = None) -> int:
    log = configure_logging()
    args = parse_args(argv)

    from megatron_vlm.config import load_config
    from megatron_vlm.data.dali_pipeline import ImagePreprocessor
    from megatron_vlm.data.image_io import encoder_image_norm

    cfg = load_config(args.recipe, args.overrides)
    enc_cfg = cfg.model.encoder
    norm = encoder_image_norm(enc_cfg)
    pre = ImagePreprocessor(enc_cfg.image_size, args.resize, norm, batch_size=args.batch_size,
                            device=args.device, decoder=args.decoder, num_threads=args.num_threads)
    tokenizer = None
    if args.tokenizer:
        from megatron_vlm.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    records, inputs, total = _records(args)
    if args.store == "images":
        summary = _store(args, pre, records, inputs, total, tokenizer, log)
    else:
        summary = _embed(args, cfg, pre, norm, records, inputs, total, tokenizer, log)
    for line in summary.lines():
        log.info("%s", line)
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
