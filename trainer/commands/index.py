"""`memtrain index DATA --out INDEX`: embed every training image once into a nearest-neighbour index
(trainer.measure.index) and print a JSON summary."""

from __future__ import annotations

import argparse
import json

from trainer.core.components import check_device
from trainer.measure.embedders import INDEX_EMBEDDINGS
from trainer.measure.index import DTYPES, build_index, index_summary


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="build a nearest-neighbour index of the training images",
        description="Embed every training image of DATA (a diffusers imagefolder with metadata.jsonl/csv, or a "
        "`datasets` save_to_disk directory) at the model's resolution, streamed in batches, and write INDEX/"
        "embeddings.safetensors and INDEX/index.json (captions, file names, duplicate-caption groups). "
        "Replication checks and generation-time guards search it.",
    )
    p.add_argument("data", metavar="DATA", help="training data directory")
    p.add_argument(
        "--out", required=True, metavar="INDEX", help="index directory to write (replaced atomically)"
    )
    p.add_argument(
        "--embedding",
        choices=INDEX_EMBEDDINGS,
        default="pixels",
        help="pixels (default; 8x8 thumbnail, as memtrain dedup), clip (local CLIP directory in --model), "
        "sscd (local TorchScript file in --model)",
    )
    p.add_argument("--model", metavar="PATH", help="the CLIP model directory or SSCD TorchScript file")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image side the index is built at, 8 to 4096 (short side resized, centre crop); default: the "
        "images' own size when they are all the same square size",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images embedded at a time (default 64)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float16", help="stored precision (default float16)"
    )
    p.add_argument("--caption-column", default="text", help="caption column (default text)")
    p.add_argument(
        "--image-column", default="image", help="image column of a datasets directory (default image)"
    )
    p.add_argument("--device", default=None, help="device for clip/sscd (default cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    index = build_index(
        args.data,
        args.out,
        embedding=args.embedding,
        path=args.model,
        resolution=args.resolution,
        batch_size=args.batch_size,
        dtype=DTYPES[args.dtype],
        caption_column=args.caption_column,
        image_column=args.image_column,
        progress=not args.no_progress,
        device=args.device,
    )
    print(json.dumps(index_summary(index, args.out), indent=2))
    return 0
