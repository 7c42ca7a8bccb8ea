"""The toy world: deterministic, planted structure as labelled, and the alignment checker."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from trainer.io import MemtrainError
from trainer.toy import world as toy_world
from trainer.toy.base import build_tokenizer
from trainer.toy.checker import alignment_scores, parse_caption
from trainer.toy.study import load_image_dir


def digest(root):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())).hexdigest()


def test_deterministic_and_structured(tmp_path):
    cfg = toy_world.ToyDataConfig(seed=7, n_duplicated=3, copies=5, n_singletons=20, n_heldout=6, n_novel=4)
    a, b = tmp_path / "a", tmp_path / "b"
    toy_world.make_toy_data(a, cfg)
    toy_world.make_toy_data(b, cfg)
    assert digest(a) == digest(b)
    labels = toy_world.read_labels(a / "labels.jsonl")
    groups = {g: [r for r in labels if r["group"] == g] for g in ("duplicated", "singleton", "heldout", "novel")}
    assert [len(groups[g]) for g in groups] == [3, 20, 6, 4]
    assert len({r["text"] for r in labels}) == len(labels)  # every caption unique across groups

    train = [json.loads(line) for line in (a / "train" / "metadata.jsonl").read_text().splitlines()]
    assert len(train) == 3 * 5 + 20
    for row in groups["duplicated"]:
        copies = [r for r in train if r["text"] == row["text"]]
        assert len(copies) == 5
        assert len({(a / "train" / r["file_name"]).read_bytes() for r in copies}) == 1
    train_texts = {r["text"] for r in train}
    assert not train_texts & {r["text"] for r in groups["heldout"] + groups["novel"]}
    # individual details: two images of one caption template still differ
    images, _ = load_image_dir(a / "train")
    assert images.shape[1:] == (3, 32, 32)
    c = toy_world.make_toy_data(tmp_path / "c", toy_world.ToyDataConfig(seed=8, n_duplicated=3, copies=5,
                                                                        n_singletons=20, n_heldout=6, n_novel=4))
    assert c["train_images"] == 35 and digest(tmp_path / "c") != digest(a)


def test_every_caption_tokenizes_into_whole_words():
    tok = build_tokenizer(toy_world.vocabulary())
    caption = "a large red circle and a small blue ring"
    ids = tok(caption).input_ids
    assert len(ids) == len(caption.split()) + 2  # BOS + one token a word + EOS
    assert tok.decode(ids[1:-1]) == caption


def test_alignment_checker_separates_true_from_shuffled_captions(tmp_path):
    toy_world.make_toy_data(tmp_path / "d", toy_world.ToyDataConfig(seed=1, n_duplicated=0, n_singletons=0,
                                                                    n_heldout=64, n_novel=0))
    images, _ = load_image_dir(tmp_path / "d" / "heldout")
    captions = [json.loads(line)["text"] for line in (tmp_path / "d" / "heldout" / "metadata.jsonl").read_text().splitlines()]
    true = alignment_scores(images, captions)
    shuffled = alignment_scores(images, captions[1:] + captions[:1])
    # chance: a random colour covers 3% of an image about 1 time in 4, the background check mostly holds
    assert true.mean() > 0.95 and shuffled.mean() < 0.6
    assert parse_caption("a small red circle and a large blue ring") == ["red", "blue"]
    # the background is never one of the object colours: an image all in red fails "a red circle"
    red = torch.tensor([220, 40, 40]).view(1, 3, 1, 1).float().expand(1, 3, 8, 8) / 255
    assert alignment_scores(red, ["a small red circle"]).item() == 0.5
    with pytest.raises(MemtrainError, match="not a toy-world caption"):
        parse_caption("a photo of a cat")
    with pytest.raises(MemtrainError, match="not a toy-world caption"):
        parse_caption("a small red circle on a blue background")  # the first toy world's grammar
    with pytest.raises(MemtrainError):
        alignment_scores(torch.zeros(2, 3, 8, 8), ["a small red circle"])
