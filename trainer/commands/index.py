"""`memtrain index DATA --out INDEX`: embed every training image once into a nearest-neighbour index
(trainer.measure.index) and print a JSON summary."""

from __future__ import annotations

import argparse
import json

from trainer.core.components import check_device
from trainer.core.distributed import is_main_process, num_processes, process_device
from trainer.io import MemtrainError, check_not_inside
from trainer.measure.ann import APPROX_MIN, DEFAULT_MAX_MEMORY, TARGET_RECALL, check_options
from trainer.measure.calibration import DEFAULT_FPR, check_fpr
from trainer.measure.embedders import INDEX_EMBEDDINGS, make_embedder
from trainer.measure.index import DTYPES
from trainer.measure.index_build import PART_ROWS, build_index, index_summary
from trainer.measure.index_calibration import calibrate_index, image_sources, load_vae
from trainer.measure.index_import import import_faiss_index


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="build a nearest-neighbour index of the training images",
        description="Embed every training image of DATA (a diffusers imagefolder with metadata.jsonl/csv, or a "
        "`datasets` save_to_disk directory) at the model's resolution, streamed in batches, and write INDEX/"
        "embeddings.safetensors and INDEX/index.json (captions, file names, duplicate-caption groups). "
        "Replication checks and generation-time guards search it. Under `accelerate launch -m trainer.cli index` the "
        "processes embed shares of the rows; finished parts (.INDEX.parts next to INDEX) are reused after a crash.",
    )
    p.add_argument("data", metavar="DATA", nargs="?", help="training data: an imagefolder or datasets directory, or webdataset "
                   "tar / parquet shards (a directory, a file or a brace pattern such as 'shards/{00000..00099}.tar')")
    p.add_argument(
        "--out", required=True, metavar="INDEX", help="index directory to write (replaced atomically)"
    )
    p.add_argument(
        "--embedding",
        choices=INDEX_EMBEDDINGS,
        default="pixels",
        help="pixels (default; 8x8 thumbnail, as memtrain dedup), gradients (the copy verdict's image gradients "
        "of a 16x16 thumbnail: tells copies from related images), clip (local CLIP directory in --model), "
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
    p.add_argument("--caption-column", default=None,
                   help="caption column (default text; with --from-faiss the first of caption, text, TEXT)")
    p.add_argument(
        "--image-column", default="image", help="image column of a datasets directory (default image)"
    )
    p.add_argument("--heldout", metavar="DIR",
                   help="held-out images never trained on (an imagefolder or a directory of images): calibrate the "
                   "copy threshold (top-1 similarity) at --fpr false positives on them and store it in the index; "
                   "`evaluate --index` and `--guard amg` then use it")
    p.add_argument("--fpr", type=float, default=DEFAULT_FPR,
                   help=f"with --heldout: the false-positive rate on the held-out images (default {DEFAULT_FPR:g})")
    p.add_argument("--vae", metavar="PIPE",
                   help="the model's pipeline directory: the training images are indexed as its VAE reproduces them "
                   "(what a generation can at best be; one VAE encode + decode per image) and, with --heldout, the "
                   "held-out images go through it too and the share of stored training images the threshold flags "
                   "(recall, a lower bound) is recorded")
    p.add_argument("--approx", default="auto", metavar="auto|exact|choose|FACTORY",
                   help=f"approximate search (faiss): auto (default) builds one above {APPROX_MIN:,} images when faiss is "
                   "installed; choose builds one whatever the size; exact never; or a faiss index_factory string such "
                   "as IVF4096,PQ64x4fs")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help=f"memory budget of the approximate index in RAM, e.g. 16G (default {DEFAULT_MAX_MEMORY}); the "
                   "most precise IVF index that fits is chosen (Flat, SQ8, then PQ)")
    p.add_argument("--target-recall", type=float, default=TARGET_RECALL,
                   help=f"recall@1 against exact search, on a held sample, that sets nprobe (default {TARGET_RECALL})")
    p.add_argument("--part-rows", type=int, default=PART_ROWS,
                   help=f"rows a process embeds and saves at a time (default {PART_ROWS}): the work shared between "
                   "the processes of accelerate launch, and what a run after a crash need not embed again")
    imported = p.add_argument_group(
        "an existing faiss index (no image embedded again)",
        "Instead of DATA: an index clip-retrieval or autofaiss built, with its metadata, as this model's training-"
        "image index. --embedding / --model must be the model it was built with; --resolution is the model's.")
    imported.add_argument("--from-faiss", metavar="FILE_OR_DIR",
                          help="the faiss index: clip-retrieval's image.index, autofaiss's knn.index, or their folder")
    imported.add_argument("--metadata", metavar="DIR_OR_PARQUET",
                          help="one parquet row per vector, in the index's order (clip-retrieval's metadata/ folder): "
                          "captions from --caption-column, file names from --name-column")
    imported.add_argument("--embeddings", metavar="DIR_OR_NPY",
                          help="the .npy vectors the index was built from (clip-retrieval's img_emb/); default: read "
                          "back from the index (approximate for SQ / PQ codes, impossible for fast-scan PQ)")
    imported.add_argument("--infos", metavar="JSON", help="autofaiss's index_infos.json (default: found beside the index)")
    imported.add_argument("--name-column", default=None,
                          help="the metadata column naming each image (default: the first of image_path, url, URL, key)")
    p.add_argument("--device", default=None, help="device for clip/sscd (default cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run_import(args: argparse.Namespace) -> int:
    """`memtrain index --from-faiss INDEX --metadata DIR ...`: an existing faiss index as the training-image index."""
    if args.data is not None or args.metadata is None or args.resolution is None:
        raise MemtrainError("--from-faiss takes no DATA and needs --metadata (the parquet rows of the vectors) and "
                            "--resolution (the side of the model's images, which the index serves)")
    for flag, value in (("--heldout", args.heldout), ("--vae", args.vae)):
        if value is not None:
            raise MemtrainError(f"{flag} does not apply to --from-faiss (it embeds images); build the index from DATA")
    check_options("exact", None, args.target_recall)  # --target-recall in (0, 1]
    if not is_main_process():  # accelerate launch: nothing to share, the main process imports
        return 0
    index = import_faiss_index(args.from_faiss, args.metadata, args.out, args.embedding, args.resolution, args.model,
                               args.embeddings, args.infos, args.caption_column, args.name_column, DTYPES[args.dtype],
                               args.target_recall, not args.no_progress)
    summary = index_summary(index, args.out)
    summary["imported"] = index.meta["imported"]
    print(json.dumps(summary, indent=2))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.from_faiss is not None:
        return run_import(args)
    if args.data is None:
        raise MemtrainError("give the training data DATA, or --from-faiss INDEX --metadata DIR for an existing index")
    args.caption_column = args.caption_column or "text"
    check_device(args.device)
    check_fpr(args.fpr)
    if args.heldout is not None:
        image_sources(args.heldout, "--heldout")  # checked before anything is embedded
    check_not_inside(args.out, {**({"--heldout": args.heldout} if args.heldout else {}),
                                **({"--vae": args.vae} if args.vae else {})})
    if args.device is None and num_processes() > 1:  # accelerate launch: each process embeds on its own device
        args.device = str(process_device())
    autoencoder = load_vae(args.vae, args.device) if args.vae is not None else None
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
        save=args.heldout is None,
        approx=args.approx,
        max_memory=args.max_memory,
        target_recall=args.target_recall,
        part_rows=args.part_rows,
        vae=autoencoder,
        vae_path=args.vae,
    )
    if index is None:  # another process of `accelerate launch` wrote it
        return 0
    if args.heldout is not None:
        embedder = make_embedder(index.embedding, args.model, args.device)
        calibrate_index(index, args.heldout, embedder, args.fpr, args.vae, args.batch_size, not args.no_progress,
                        args.device, autoencoder)
        index.save(args.out)
    summary = index_summary(index, args.out)
    if index.copy_calibration() is not None:
        summary["calibration"] = index.copy_calibration().describe()
    print(json.dumps(summary, indent=2))
    return 0
