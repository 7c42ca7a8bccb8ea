"""`memtrain dedup`."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from trainer.core.components import check_device
from trainer.core.distributed import across_processes, is_main_process, num_processes, process_device
from trainer.data import load_rows
from trainer.data_shards import shard_files
from trainer.io import MemtrainError, atomic_dir, check_output, write_json
from trainer.measure import ann
from trainer.measure.features import EMBEDDINGS, check_model_path, embed_images
from trainer.measure.index import TrainingIndex
from trainer.measure.index_data import check_index_data, embeddings_in_row_order, row_file_names
from trainer.mitigate.dedup import DEFAULT_THRESHOLD, PHASH_THRESHOLD, dedup_report
from trainer.plots import plot_groups
from trainer.report.render import dedup_markdown


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dedup",
        help="find near-duplicate images and duplicated captions in an imagefolder dataset",
        description="Embed every image of DATA (a diffusers imagefolder: metadata.jsonl with file_name "
        "and text, text a string or a list of strings), group near-duplicates (cosine >= threshold, "
        "connected components) and exact / normalized caption duplicates, and write OUT/report.json, "
        "OUT/report.md and OUT/groups.png. Use data.dedup=drop|reweight in a recipe to act on them.",
    )
    p.add_argument("data", metavar="DATA", help="imagefolder directory with metadata.jsonl, or webdataset tar / "
                   "parquet shards (a directory, a file or a brace pattern such as 'shards/{00000..00099}.tar')")
    p.add_argument("--out", required=True, metavar="DIR", help="where report.json, report.md, groups.png go")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help=f"cosine similarity that links two images (default {DEFAULT_THRESHOLD}; "
        f"{PHASH_THRESHOLD} for phash, i.e. <= 4 of 64 bits differ)",
    )
    p.add_argument(
        "--embedding",
        choices=EMBEDDINGS,
        default=None,
        help="pixels (default; 8x8 thumbnail), phash (64-bit DCT hash), clip (needs --clip), "
        "sscd (needs --sscd); default clip/sscd when --clip/--sscd is given",
    )
    p.add_argument(
        "--clip",
        metavar="PATH",
        help="local CLIP model directory (CLIPModel or CLIPVisionModelWithProjection)",
    )
    p.add_argument("--sscd", metavar="PATH", help="local SSCD TorchScript file")
    p.add_argument(
        "--search",
        choices=("exact", "semdedup", "index"),
        default="exact",
        help="exact: every pair, in blocks (default); semdedup: only pairs within k-means clusters; index: pairs "
        "within the inverted lists of a faiss IVF index (--index's when it is IVF, else k-means), each image in its --probe "
        "nearest lists (memory bounded by a list; needs faiss)",
    )
    p.add_argument(
        "--clusters", type=int, default=None,
        help="k-means clusters / inverted lists for --search semdedup or index (default about sqrt(n))"
    )
    p.add_argument("--probe", type=int, default=2,
                   help="--search index: inverted lists each image is compared within (default 2)")
    p.add_argument("--index", metavar="INDEX",
                   help="a `memtrain index` of DATA (or an imported one naming DATA's files): its embeddings are used "
                   "(no re-embedding) and, with --search index, the inverted lists of its approximate index")
    p.add_argument("--caption-column", default="text", help="caption field of metadata.jsonl (default text)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size for clip/sscd (default 32)")
    p.add_argument("--device", default=None, help="torch device for clip/sscd (default cuda if available)")
    p.set_defaults(func=run)


def embed_across_processes(images, names, embedding: str, args: argparse.Namespace) -> np.ndarray:
    """[N, d] embeddings computed in shares of whole batches by the processes of `accelerate launch`."""
    def share(rows: list[int]) -> list[np.ndarray]:
        return list(embed_images([images[i] for i in rows], [names[i] for i in rows], embedding, clip=args.clip,
                                 sscd=args.sscd, batch_size=args.batch_size, device=args.device or str(process_device())))
    return np.stack(across_processes(share, range(len(images)), unit=args.batch_size))


def run(args: argparse.Namespace) -> int:
    root = Path(args.data)
    shards = shard_files(args.data)
    if shards is None and not root.is_dir():
        raise MemtrainError(f"{root} is not a directory (want a diffusers imagefolder with metadata.jsonl, or "
                            "webdataset / parquet shards)")
    if shards is None and not (root / "metadata.jsonl").exists() and not (root / "metadata.csv").exists():
        raise MemtrainError(
            f"{root} has no metadata.jsonl (diffusers imagefolder: one JSON object per line "
            "with file_name and text) and no .tar or .parquet shards"
        )
    if shards is not None and not root.is_dir():
        root = shards[0].parent
    inputs = {"DATA": root, "--clip": args.clip, "--sscd": args.sscd, "--index": args.index}
    check_output(args.out, "dedup", inputs)
    check_device(args.device)
    embedding = args.embedding or ("clip" if args.clip else "sscd" if args.sscd else "pixels")
    if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
        raise MemtrainError(f"--threshold must be in (0, 1], got {args.threshold}")
    if args.clusters is not None and args.clusters < 1:
        raise MemtrainError(f"--clusters must be >= 1, got {args.clusters}")
    if args.probe < 1:
        raise MemtrainError(f"--probe must be >= 1, got {args.probe}")
    if args.search == "index" and ann.faiss is None:
        raise MemtrainError("--search index needs faiss: pip install faiss-cpu (the memtrain[faiss] extra)")
    embeddings, quantizer, lists = None, None, "k-means lists"
    if args.index is not None:
        check_index_data(args.index, args.data)
        index = TrainingIndex.load(args.index)
        if args.embedding not in (None, index.embedding):
            raise MemtrainError(f"--index {args.index} holds {index.embedding} embeddings, not {args.embedding}; drop "
                                "--embedding or build the index with it")
        embeddings, embedding = index.embeddings, index.embedding
        if args.search == "index" and index.ann_index is not None:  # an imported HNSW / Flat index has no lists
            ivf = ann.faiss.try_extract_index_ivf(index.ann_index)
            quantizer = ivf.quantizer if ivf is not None else None
            lists = ("the inverted lists of --index's IVF index" if ivf is not None else
                     f"k-means lists: --index's {type(index.ann_index).__name__} has no inverted lists")
    if args.batch_size < 1:
        raise MemtrainError(f"--batch-size must be >= 1, got {args.batch_size}")
    if embedding == "clip" and embeddings is None:
        check_model_path(args.clip, "clip", "a local CLIP model directory")
    if embedding == "sscd" and embeddings is None:
        check_model_path(args.sscd, "sscd", "an SSCD TorchScript file")
    rows = load_rows(str(args.data), caption_column=args.caption_column)
    names = [str(n) for n in rows.names]
    if args.index is not None:  # the index's embeddings of the data's rows, in the data's order
        embeddings = embeddings_in_row_order(index, row_file_names(rows.images, Path(args.data)), f"--index {args.index}")
    if embeddings is None and num_processes() > 1:  # accelerate launch: the processes embed shares of the rows
        embeddings = embed_across_processes(rows.images, names, embedding, args)
        if not is_main_process():
            return 0
    report = dedup_report(
        rows.images,
        rows.captions,
        threshold=args.threshold,
        embedding=embedding,
        clip=args.clip,
        sscd=args.sscd,
        names=names,
        search=args.search,
        clusters=args.clusters,
        batch_size=args.batch_size,
        device=args.device,
        embeddings=embeddings,
        probe=args.probe,
        quantizer=quantizer,
    )
    report["data"] = str(root)
    if args.search == "index":
        report["lists"] = lists
    out = Path(args.out)
    with atomic_dir(out, "dedup", inputs) as tmp:
        write_json(report, tmp / "report.json")
        (tmp / "report.md").write_text(dedup_markdown(report, str(root)))
        plot_groups(report, rows.images, names, tmp / "groups.png")
    s = report["summary"]
    print(
        f"{report['n']} images: {s['image_groups']} near-duplicate groups ({s['duplicates_to_drop']} extra copies), "
        f"{s.get('caption_groups_exact', 0)} exact / {s.get('caption_groups_normalized', 0)} normalized caption "
        f"groups -> {out}/report.md"
    )
    return 0
