"""The memorization monitor in the training loop: curves in every tracker, resume, alarm, bad input."""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file

from trainer.cli import main
from trainer.io import MemtrainError
from trainer.tracking import read_jsonl

METRICS = ("clid_auc", "clid_tpr_at_1fpr", "clid_mean_member", "clid_mean_heldout", "noise_auc",
           "noise_tpr_at_1fpr", "noise_mean_member", "noise_mean_novel")


def monitor_section(tiny_data, **overrides) -> dict:
    """Monitor every 2 steps on 8 members, the 4 held-out pairs and the 4 novel prompts of the toy data."""
    return {"every_steps": 2, "members": 8, "heldout": str(tiny_data / "labels.jsonl"), "heldout_count": 4,
            "novel_prompts": str(tiny_data / "labels.jsonl"), "novel_count": 4, "table_generations": 0,
            **overrides}


def monitor_json(out) -> dict:
    return json.loads((out / "monitor.json").read_text())


def values(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in ("seconds", "time")}


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    home = tmp_path / "wandb-home"
    home.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the run goes into OUT/wandb
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return home


def wandb_records(path) -> list:
    """The records of an offline W&B run file (`run-<id>.wandb`): a LevelDB-style log of 32 KiB
    blocks (7-byte header ":W&B" + magic + version, then chunks crc32/length/type) of protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_monitor_logs_to_every_tracker_and_matches_the_detectors(tmp_path, tiny_model, tiny_data, wandb_env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    heldout_dir = tiny_data / "heldout"  # an imagefolder here; the labels file still labels the member groups
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out,
                          log={"trackers": ["wandb", "tensorboard"]},
                          monitor=monitor_section(tiny_data, heldout=str(heldout_dir), table_generations=2))
    assert main(["train", str(recipe)]) == 0
    report = monitor_json(out)
    history = report["history"]
    assert [h["step"] for h in history] == [2, 4]
    probe = report["probe"]
    assert len(probe["members"]) == 8 and len(probe["heldout"]) == 4 and len(probe["novel"]) == 4
    assert {m["group"] for m in probe["members"]} <= {"duplicated", "singleton"}
    for h in history:
        for key in ("clid_auc", "clid_tpr_at_1fpr", "noise_auc", "noise_tpr_at_1fpr"):
            assert 0.0 <= h[key] <= 1.0, (key, h[key])
        assert all(math.isfinite(h[k]) for k in METRICS)
        assert any(k.startswith("clid_mean_") and k not in METRICS for k in h)  # per toy group
        captions = [m["caption"] for m in probe["members"]]
        # 15 UNet evals per CLiD sample, 1 per distinct Wen prompt + 1 shared unconditional, 2 x 50 per table generation
        expected = 15 * 12 + len(set(captions + probe["novel"])) + 1 + 100 * min(2, len(set(captions)))
        assert h["unet_evals"] == expected and h["seconds"] > 0
    cost = report["cost"]
    assert cost["calls"] == 2 and cost["seconds"] == pytest.approx(sum(h["seconds"] for h in history))
    assert 0 < cost["fraction_of_training"] < 1 and report["alarm"] is None
    assert (out / "monitor.png").stat().st_size > 0 and (out / "pipeline").is_dir()

    # JSONL: one row per call with every value under monitor/
    rows = [r for r in read_jsonl(out / "logs" / "metrics.jsonl") if "monitor/clid_auc" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for row, h in zip(rows, history, strict=True):
        assert {k: row[f"monitor/{k}"] for k in h if k != "step"} == {k: v for k, v in h.items() if k != "step"}

    # TensorBoard scalars
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    for key in METRICS:
        assert [s for s, _ in scalars[f"monitor/{key}"]] == [2, 4]
        assert [v for _, v in scalars[f"monitor/{key}"]] == pytest.approx([h[key] for h in history], rel=1e-6)

    # W&B (offline): the history rows of the run file, and the tables
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = wandb_records(next(runs[0].glob("run-*.wandb")))
    logged = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            if "monitor/clid_auc" in items:
                logged[record.history.step.num] = items
    assert sorted(logged) == [2, 4]
    for h in history:
        for key in METRICS:
            assert json.loads(logged[h["step"]][f"monitor/{key}"]) == pytest.approx(h[key], rel=1e-12)
        assert json.loads(logged[h["step"]]["monitor/generations/_type"]) == "table-file"
    tables = sorted((runs[0] / "files" / "media" / "table" / "monitor").glob("generations_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[-1].read_text())
    assert table["columns"][:4] == ["step", "prompt", "generation", "nearest training image"]
    assert len(table["data"]) == 2 and {row[1] for row in table["data"]} <= set(captions)
    assert all(0 <= row[5] <= 1 for row in table["data"])  # pixel L2 in [0, 1]
    # the images of the table travel in a run artifact (uploaded by `wandb sync`)
    manifests = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    generations = [a for a in manifests if "generations" in a.name]
    assert len(generations) == 2
    for artifact in generations:
        paths = [c.path for c in artifact.manifest.contents]
        assert "monitor/generations.table.json" in paths and any(p.endswith(".png") for p in paths)
    assert any("curves" in a.name for a in manifests)  # the line-series chart

    # the values are the detectors' own, called directly on the same probe with the step-2 weights
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from trainer import data as data_lib
    from trainer.detect.clid import clid_features, clid_th_scores
    from trainer.detect.prompt import noise_magnitude
    from trainer.measure.metrics import auroc, tpr_at_fpr

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet")
    unet.load_state_dict(load_file(str(out / "checkpoints" / "checkpoint-2" / "model.safetensors")))
    components = dict(unet=unet.eval(), vae=AutoencoderKL.from_pretrained(str(tiny_model), subfolder="vae"),
                      text_encoder=CLIPTextModel.from_pretrained(str(tiny_model), subfolder="text_encoder"),
                      tokenizer=CLIPTokenizer.from_pretrained(str(tiny_model), subfolder="tokenizer"),
                      scheduler=DDPMScheduler.from_pretrained(str(tiny_model), subfolder="scheduler"))
    train_rows = data_lib.load_rows(str(tiny_data / "train"))
    held_rows = data_lib.load_rows(str(heldout_dir))

    def pixels(rows, index):
        return torch.stack([data_lib.image_to_tensor(data_lib.open_image(rows.images[i], ""), 16, True, False,
                                                     random.Random(0)) for i in index])

    members = [m["row"] for m in probe["members"]]
    held = [m["row"] for m in probe["heldout"]]
    captions = [train_rows.captions[i][0] for i in members] + [held_rows.captions[i][0] for i in held]
    assert captions == [m["caption"] for m in probe["members"] + probe["heldout"]]
    features = clid_features(components, torch.cat([pixels(train_rows, members), pixels(held_rows, held)]), captions,
                             seed=0)
    scores = clid_th_scores(features, features[8:], 0.5)
    labels = np.r_[np.ones(8), np.zeros(4)]
    magnitude = noise_magnitude(components, captions[:8] + probe["novel"], n=1, seed=0).numpy()
    step2 = history[0]
    assert step2["clid_auc"] == auroc(scores, labels)
    assert step2["clid_tpr_at_1fpr"] == tpr_at_fpr(scores, labels, 0.01)
    assert step2["clid_mean_member"] == pytest.approx(scores[:8].mean(), rel=1e-6, abs=1e-9)
    assert step2["clid_mean_heldout"] == pytest.approx(scores[8:].mean(), rel=1e-6, abs=1e-9)
    assert step2["noise_auc"] == auroc(magnitude, labels)
    # float32 sums over differently composed batches: agreement to ~1e-6, not bit for bit
    assert step2["noise_mean_member"] == pytest.approx(magnitude[:8].mean(), rel=1e-5)
    assert step2["noise_mean_novel"] == pytest.approx(magnitude[8:].mean(), rel=1e-5)


def test_resume_continues_the_curves_and_the_monitor_does_not_change_training(tmp_path, tiny_model, tiny_data):
    """Interrupted at step 2 and resumed: monitor.json holds steps 2 and 4 with the values of an
    uninterrupted run; an unmonitored run ends with the same weights."""
    full = tmp_path / "full"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", full,
                          monitor=monitor_section(tiny_data))
    assert main(["train", str(recipe)]) == 0
    part = tmp_path / "part"
    assert main(["train", str(recipe), f"output.dir={part}", "train.max_steps=2"]) == 0
    first = monitor_json(part)
    assert [h["step"] for h in first["history"]] == [2]
    assert main(["train", str(recipe), f"output.dir={part}", "checkpoint.resume=latest"]) == 0

    a, b = monitor_json(full), monitor_json(part)
    assert [h["step"] for h in b["history"]] == [2, 4]
    for x, y in zip(a["history"], b["history"], strict=True):
        assert values(x) == pytest.approx(values(y), rel=1e-9, abs=1e-12)
    assert b["history"][0] == first["history"][0]  # carried through the checkpoint, seconds included
    assert b["cost"]["calls"] == 2 and b["cost"]["train_seconds"] > first["cost"]["train_seconds"]
    assert b["probe"] == a["probe"]
    resumed = [r["step"] for r in read_jsonl(part / "logs" / "metrics.jsonl") if "monitor/clid_auc" in r]
    assert resumed == [2, 4]

    plain = tmp_path / "plain"
    assert main(["train", str(recipe), f"output.dir={plain}", "monitor.every_steps=0"]) == 0
    assert not (plain / "monitor.json").exists()
    name = "pipeline/unet/diffusion_pytorch_model.safetensors"
    w_full, w_plain = load_file(str(full / name)), load_file(str(plain / name))
    assert all(torch.equal(w_full[k], w_plain[k]) for k in w_full)


def test_alarm_stop_keeps_the_last_good_checkpoint(tmp_path, capsys, tiny_model, tiny_data):
    out = tmp_path / "stop"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out, checkpoint={"every_steps": 1},
                          monitor=monitor_section(tiny_data, alarm_threshold=0.0, alarm_action="stop",
                                                  alarm_metric="noise_auc"))
    assert main(["train", str(recipe)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["export"] is None and summary["monitor"]["alarm"]["step"] == 2
    assert "warning: memorization alarm at step 2: monitor/noise_auc=" in captured.err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]
    assert not (out / "pipeline").exists()
    report = monitor_json(out)
    alarm = report["alarm"]
    assert alarm["metric"] == "noise_auc" and alarm["action"] == "stop" and alarm["threshold"] == 0.0
    assert alarm["value"] == report["history"][-1]["noise_auc"]
    assert alarm["last_good_checkpoint"] == str(out / "checkpoints" / "checkpoint-1")
    assert [r["step"] for r in read_jsonl(out / "logs" / "metrics.jsonl") if "loss" in r] == [1, 2]

    # warn: training goes on and exports; every crossing is recorded
    warn = tmp_path / "warn"
    assert main(["train", str(recipe), f"output.dir={warn}", "monitor.alarm_action=warn"]) == 0
    assert capsys.readouterr().err.count("warning: memorization alarm") == 2
    report = monitor_json(warn)
    assert report["alarm"] is None and [a["step"] for a in report["alarms"]] == [2, 4]
    assert (warn / "pipeline").is_dir()


@pytest.mark.slow
def test_alarm_stop_under_two_processes(tmp_path, tiny_model, tiny_data):
    """DDP: the main process measures, every rank stops at the same step (no hang, no new checkpoint)."""
    out = tmp_path / "two"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out, checkpoint={"every_steps": 1},
                          train={"batch_size": 2},
                          monitor=monitor_section(tiny_data, alarm_threshold=0.0, alarm_action="stop"))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "trainer.cli", "train", str(recipe)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [s["steps"] for s in summaries] == [2]  # the main process alone prints the summary
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]
    report = monitor_json(out)
    assert [h["step"] for h in report["history"]] == [2] and report["alarm"]["step"] == 2
    assert not (out / "pipeline").exists()


def test_member_probe_is_distinct_images_and_the_same_after_drop_dedup(tmp_path, tiny_model, tiny_data):
    """The default probe holds each image once, and a `drop`-de-duplicated run of the same data gets the
    very same member images; `distinct_members=false` draws among all rows (copies included)."""
    from trainer.config import load_recipe
    from trainer.data import load_rows
    from trainer.mitigate.dedup import apply_dedup_policy
    from trainer.recipe import TrainRecipe
    from trainer.training.monitor import Monitor

    recipe_file = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "out",
                               monitor=monitor_section(tiny_data, members=10))
    rows = load_rows(str(tiny_data / "train"))
    groups = {name: name.split("_")[0] for name in rows.names}  # dupNNNN_copy.png: one image per NNNN

    def probe(overrides: list[str], dedup: str = "none") -> list[str]:
        recipe = load_recipe(TrainRecipe, recipe_file, overrides)
        train_rows, _ = apply_dedup_policy(rows, dedup, progress=False)
        monitor = Monitor.from_recipe(recipe, train_rows, 16)
        return [m["name"] for m in monitor.describe_probe()["members"]]

    plain = probe([])
    assert len(plain) == 10 and len({groups[n] for n in plain}) == 10  # all 10 distinct images, once each
    assert probe([], "drop") == plain
    every_row = probe(["monitor.distinct_members=false", "monitor.members=16"])
    assert sorted(every_row) == sorted(rows.names)  # all 16 rows: the 2 x 4 copies too


@pytest.mark.parametrize(("overrides", "expected"), [
    (["monitor.alarm_threshold=1.5"], "`monitor.alarm_threshold` must be in [0, 1]"),
    (["monitor.clid_alpha=-0.1"], "`monitor.clid_alpha` must be in [0, 1]"),
    (["monitor.members=0"], "`monitor.members` must be >= 1"),
    (["monitor.members=100"], "`monitor.members`=100 is larger than the training data (16 rows"),
    (["monitor.members=12"], "`monitor.members`=12 is larger than the distinct training images (10 of the 16 rows"),
    (["monitor.heldout_count=5"], "`monitor.heldout_count`=5 is larger than the held-out data (4 pairs"),
    (["monitor.novel_count=9"], "`monitor.novel_count`=9 is larger than the novel prompts (4 in"),
    (["monitor.heldout=null"], "`monitor.heldout` is required when `monitor.every_steps` > 0"),
    (["monitor.heldout={missing}"], "no such file or directory"),
    (["monitor.heldout={root}"], "`monitor.heldout`={root}: cannot load dataset"),
    (["monitor.heldout={bare}"], "no held-out pairs"),
    (["monitor.novel_prompts={bare}"], 'no rows with group novel'),
])
def test_bad_monitor_input_fails_before_training(tmp_path, capsys, tiny_model, tiny_data, overrides, expected):
    bare = tmp_path / "labels.jsonl"  # labels of a dataset without held-out pairs or novel prompts
    bare.write_text("".join(line + "\n" for line in (tiny_data / "labels.jsonl").read_text().splitlines()
                            if json.loads(line)["group"] in ("duplicated", "singleton")))
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", out,
                          monitor=monitor_section(tiny_data))
    names = dict(bare=bare, missing=tmp_path / "nowhere", root=tiny_data)
    overrides = [o.format(**names) for o in overrides]
    expected = expected.format(**names)
    assert main(["train", str(recipe), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and expected in err, err
    assert not out.exists() or not any(out.iterdir())


def test_heldout_pairs_from_an_evaluate_style_membership_file(tmp_path, tiny_data):
    """`monitor.heldout` reads a labelled prompt file as `memtrain evaluate` does: non-members are the
    `member: 0` rows (or group heldout), under any text key; rows without a role are not held out."""
    from trainer.recipe import MonitorSection
    from trainer.training.monitor import load_heldout

    labels = [json.loads(line) for line in (tiny_data / "labels.jsonl").read_text().splitlines()]
    heldout = [r for r in labels if r["group"] == "heldout"]
    members = [r for r in labels if r["group"] == "singleton"][:3]
    def row(r, member):  # absolute image paths, so the file can live outside the dataset
        return {"caption": r["text"], "file_name": str(tiny_data / r["file_name"]), "member": member}

    rows = [row(r, 0) for r in heldout] + [row(r, 1) for r in members]
    rows.append({"caption": "a prompt without a role"})
    membership = tmp_path / "membership.jsonl"
    membership.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held, _ = load_heldout(MonitorSection(heldout=str(membership)), None)
    assert [c[0] for c in held.captions] == [r["text"] for r in heldout]
    assert held.images == [tiny_data / r["file_name"] for r in heldout]
    assert all(p.exists() for p in held.images)


def test_the_monitor_reads_the_group_names_of_monitor_label_groups(tmp_path, tiny_data):
    """`monitor.label_groups` gives the roles of a labels file's groups, as `memtrain evaluate --label-groups`: with
    the toy world's groups renamed, the novel prompts and held-out pairs are the same rows as before the renaming,
    and the default roles find neither."""
    from trainer.recipe import MonitorSection
    from trainer.training.monitor import load_heldout, load_novel

    names = {"novel": "fresh", "heldout": "unseen", "duplicated": "copied", "singleton": "single"}
    labels = [json.loads(line) for line in (tiny_data / "labels.jsonl").read_text().splitlines()]
    renamed = tmp_path / "labels.jsonl"
    renamed.write_text("".join(json.dumps({**r, "group": names[r["group"]],
                                           **({"file_name": str(tiny_data / r["file_name"])} if r.get("file_name") else {})})
                               + "\n" for r in labels))
    roles = tmp_path / "roles.yaml"
    roles.write_text("memorized: [copied]\nnot_memorized: [fresh]\nmembers: [copied, single]\nnon_members: [unseen]\n")
    cfg = MonitorSection(heldout=str(renamed), novel_prompts=str(renamed), label_groups=str(roles))
    novel, _ = load_novel(cfg)
    assert novel == [r["text"] for r in labels if r["group"] == "novel"] and novel
    held, groups = load_heldout(cfg, None)
    assert [c[0] for c in held.captions] == [r["text"] for r in labels if r["group"] == "heldout"]
    assert set(groups.values()) == set(names.values())
    with pytest.raises(MemtrainError, match="no rows with group novel"):
        load_novel(MonitorSection(novel_prompts=str(renamed)))
    roles.write_text("memorized: [copied]\n")
    with pytest.raises(MemtrainError, match="`monitor.label_groups`"):
        load_novel(cfg)
