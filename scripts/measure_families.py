"""What separates copies from related held-out images? Generations of a fine-tuned checkpoint on a
toy data directory (`memtrain toy-data --world families`, or the shape world) against the training images
as the model's VAE reproduces them, beside the held-out images through the same VAE.

    python scripts/measure_families.py PIPELINE DATA OUT [-n 2 --guidance-scale 3 --max-per-group 64]

Writes OUT/measure.json (per generation and per held-out image: NN1 L2, NN2 L2, NN1/NN2 ratio, nearest
training image, its group), OUT/measure.md (per-group rates of each criterion: Gu's ratio < 1/3, the
demo's < 0.5, and NN1 L2 and ratio thresholds calibrated at 1% FPR on the held-out images) and
OUT/<group>.png (generation | nearest training image, titled with L2 and ratio) to check by eye.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from trainer.core.components import load_pipeline
from trainer.measure.calibration import calibrate
from trainer.measure.replication import replication_metrics, unique_images, vae_roundtrip
from trainer.plots import save_replication_grid
from trainer.sample.generate import generate_images
from trainer.toy.study import load_image_dir
from trainer.toy.world import read_labels

GROUPS = ("duplicated", "singleton", "heldout", "novel")


def _q(x, qs=(0.0, 0.05, 0.5, 0.95, 1.0)) -> list[float]:
    return [round(float(v), 4) for v in np.quantile(np.asarray(x, dtype=np.float64), qs)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pipeline")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("-n", type=int, default=2)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--max-per-group", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fpr", type=float, default=0.01)
    args = p.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    labels = read_labels(data / "labels.jsonl")
    train, names = load_image_dir(data / "train")
    unique, inverse = unique_images(train)
    file_to_unique = {f"train/{name}": int(inverse[i]) for i, name in enumerate(names)}
    unique_group = {file_to_unique[r["file_name"]]: r["group"] for r in labels if r.get("file_name") in file_to_unique}
    rows = [r for g in GROUPS for r in [x for x in labels if x["group"] == g][:args.max_per_group]]

    torch.manual_seed(0)
    pipe = load_pipeline(args.pipeline)
    refs = vae_roundtrip(pipe, unique)
    held, _ = load_image_dir(data / "heldout")
    held_vae = vae_roundtrip(pipe, held)
    saved = out / "generations.npy"  # uint8 [G, 3, H, W]: a rerun with the same settings measures again
    if saved.exists() and np.load(saved).shape[0] == len(rows) * args.n:
        gens = torch.from_numpy(np.load(saved)).float() / 255
    else:
        gens = generate_images(pipe, [r["text"] for r in rows], n=args.n, seed=args.seed,
                               guidance_scale=args.guidance_scale)
        gens = (gens * 255).round() / 255
        np.save(saved, (gens * 255).round().to(torch.uint8).numpy())

    m = replication_metrics(gens, refs)
    h = replication_metrics(held_vae, refs)
    h_pix = replication_metrics(held, unique)  # the pixel images, without the VAE
    keys = ("l2", "l2_second", "ratio", "nn_index", "tiled_l2", "nl2", "gradient_ratio", "gradient_nn_index")
    generations = []
    for i in range(len(gens)):
        r = rows[i // args.n]
        g = {k: m[k][i].item() for k in keys}
        g.update(text=r["text"], group=r["group"], family=r.get("family"),
                 source=file_to_unique.get(r.get("file_name"), -1),
                 nearest_group=unique_group.get(int(g["nn_index"]), "unlabelled"))
        g["nearest_is_source"] = g["nn_index"] == g["source"]
        generations.append(g)
    heldout = [{k: h[k][i].item() for k in keys} | {"pixel_l2": h_pix["l2"][i].item(),
                                                    "pixel_ratio": h_pix["ratio"][i].item()}
               for i in range(len(held))]

    cal_l2 = calibrate(h["l2"].numpy(), "NN1 L2", higher_is_copy=False, fpr=args.fpr)
    cal_ratio = calibrate(h["ratio"].numpy(), "NN1/NN2 ratio", higher_is_copy=False, fpr=args.fpr)
    cal_tiled = calibrate(h["tiled_l2"].numpy(), "tiled L2", higher_is_copy=False, fpr=args.fpr)
    cal_grad = calibrate(h["gradient_ratio"].numpy(), "gradient ratio", higher_is_copy=False, fpr=args.fpr)
    criteria = {"ratio < 1/3 (Gu)": lambda g: g["ratio"] < 1 / 3,
                "ratio < 0.5 (demo)": lambda g: g["ratio"] < 0.5,
                f"L2 < {cal_l2.threshold:.4f} (held-out {args.fpr:.0%})": lambda g: g["l2"] < cal_l2.threshold,
                f"ratio < {cal_ratio.threshold:.3f} (held-out {args.fpr:.0%})": lambda g: g["ratio"] < cal_ratio.threshold,
                f"tiled L2 < {cal_tiled.threshold:.4f} (held-out {args.fpr:.0%})":
                    lambda g: g["tiled_l2"] < cal_tiled.threshold,
                f"gradient ratio < {cal_grad.threshold:.3f} (held-out {args.fpr:.0%}; the default verdict)":
                    lambda g: g["gradient_ratio"] < cal_grad.threshold}
    table = {}
    for group in GROUPS:
        gs = [g for g in generations if g["group"] == group]
        if not gs:
            continue
        table[group] = {"generations": len(gs), **{name: float(np.mean([f(g) for g in gs])) for name, f in criteria.items()},
                        "nearest is own image": float(np.mean([g["nearest_is_source"] for g in gs])),
                        "nearest is duplicated": float(np.mean([g["nearest_group"] == "duplicated" for g in gs])),
                        "L2 quantiles": _q([g["l2"] for g in gs]), "ratio quantiles": _q([g["ratio"] for g in gs]),
                        "tiled L2 quantiles": _q([g["tiled_l2"] for g in gs])}
    held_row = {"images": len(held), **{name: float(np.mean([f(x) for x in heldout])) for name, f in criteria.items()},
                "L2 quantiles": _q(h["l2"]), "ratio quantiles": _q(h["ratio"]), "tiled L2 quantiles": _q(h["tiled_l2"]),
                "pixel L2 quantiles": _q(h_pix["l2"]), "pixel ratio quantiles": _q(h_pix["ratio"])}
    # what separates copies from held-out images: the duplicated prompts' generations nearest their own view
    # (copies by eye on both worlds, docs/results.md) against the held-out images through the VAE
    own = [g for g in generations if g["group"] == "duplicated" and g["nearest_is_source"]]
    separation = {}
    for key in ("l2", "ratio", "tiled_l2", "nl2", "gradient_ratio"):
        pos, neg = np.array([g[key] for g in own]), h[key].double().numpy()
        cal = calibrate(neg, key, higher_is_copy=False, fpr=args.fpr)
        separation[key] = {"auroc": float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], -np.r_[pos, neg]))
                           if len(pos) else None, "recall_at_fpr": float(cal.flags(pos).mean()) if len(pos) else None,
                           "threshold": cal.threshold}
    print(json.dumps({"own-view generations": len(own), "held-out images": len(neg), **separation}, indent=1))
    result = {"separation": separation, "pipeline": args.pipeline, "data": str(data), "n": args.n, "guidance_scale": args.guidance_scale,
              "calibration": {"l2": cal_l2.to_dict(), "ratio": cal_ratio.to_dict(), "tiled_l2": cal_tiled.to_dict(),
                              "gradient_ratio": cal_grad.to_dict()}, "groups": table,
              "heldout_images_vae": held_row, "generations": generations, "heldout": heldout}
    (out / "measure.json").write_text(json.dumps(result, indent=1))

    names_ = list(criteria)
    lines = ["| generations of | n | " + " | ".join(names_) + " | NN1 is own image | NN1 L2 min / 5% / median / 95% / max "
             "| ratio min / 5% / median / 95% / max | tiled L2 min / 5% / median / 95% / max |",
             "|" + "---|" * (len(names_) + 6)]
    for group, t in [*table.items(), ("held-out images (VAE), not generated", held_row)]:
        n = t.get("generations", t.get("images"))
        own = f"{t['nearest is own image']:.0%}" if "nearest is own image" in t else "-"
        lines.append(f"| {group} | {n} | " + " | ".join(f"{t[c]:.1%}" for c in names_) + f" | {own} | "
                     + " / ".join(f"{v:.3f}" for v in t["L2 quantiles"]) + " | "
                     + " / ".join(f"{v:.2f}" for v in t["ratio quantiles"]) + " | "
                     + " / ".join(f"{v:.3f}" for v in t["tiled L2 quantiles"]) + " |")
    (out / "measure.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    for group in GROUPS:
        idx = [i for i, g in enumerate(generations) if g["group"] == group]
        if idx:
            idx = sorted(idx, key=lambda i: generations[i]["l2"])
            titles = [f"{generations[i]['l2']:.3f} r={generations[i]['ratio']:.2f} t={generations[i]['tiled_l2']:.2f} "
                      f"{'own' if generations[i]['nearest_is_source'] else generations[i]['nearest_group'][:4]}"
                      for i in idx]
            save_replication_grid(out / f"{group}.png", gens[idx], refs[m["nn_index"][idx]], titles, ncols=8)
    order = np.argsort(h["l2"].numpy())
    save_replication_grid(out / "heldout_images.png", held_vae[order], refs[h["nn_index"][order]],
                          [f"{h['l2'][i]:.3f} r={h['ratio'][i]:.2f} t={h['tiled_l2'][i]:.2f}" for i in order], ncols=8)


if __name__ == "__main__":
    main()
