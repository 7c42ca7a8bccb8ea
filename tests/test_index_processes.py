"""`memtrain index` across processes (trainer/measure/index_build.py): 2 real processes (gloo, CPU, torchrun)
write the 1-process index; a run after a crash embeds only the parts the crash left unwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainer
from trainer.cli import main
from trainer.measure import index_build
from trainer.measure.embedders import make_embedder
from trainer.measure.index import TrainingIndex
from trainer.measure.index_build import build_index, parts_dir
from trainer.training.launch import free_port


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    source = str(Path(trainer.__file__).parent.parent)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "trainer.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_write_the_one_process_index(tmp_path, tiny_data):
    """16 rows in parts of 3 (6 parts, 3 a process): the same embeddings, captions and file names; one summary."""
    args = ["index", str(tiny_data / "train"), "--part-rows", "3", "--batch-size", "2", "--no-progress"]
    two = torchrun(*args, "--out", str(tmp_path / "two"))
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert two.stdout.count('"images": 16') == 1  # only the main process prints
    one, both = TrainingIndex.load(tmp_path / "one"), TrainingIndex.load(tmp_path / "two")
    assert torch.equal(one.embeddings, both.embeddings)
    assert (one.captions, one.file_names) == (both.captions, both.file_names)
    assert one.meta["fingerprint"] == both.meta["fingerprint"]
    assert not parts_dir(tmp_path / "one").exists() and not parts_dir(tmp_path / "two").exists()


def test_a_run_after_a_crash_embeds_only_the_missing_parts(tmp_path, tiny_data, monkeypatch):
    embedded = []

    def counting(embedding, path, device, crash_after=None):
        inner = make_embedder(embedding, path, device)

        class Counting(torch.nn.Module):
            dim = inner.dim

            def forward(self, images):
                if crash_after is not None and len(embedded) >= crash_after:
                    raise KeyboardInterrupt  # the process dies in the middle of the third part
                embedded.append(len(images))
                return inner(images)
        return Counting()

    out = tmp_path / "idx"
    monkeypatch.setattr(index_build, "make_embedder", lambda *a: counting(*a, crash_after=5))
    with pytest.raises(KeyboardInterrupt):
        build_index(str(tiny_data / "train"), str(out), part_rows=4, batch_size=2, progress=False)
    assert sorted(p.name for p in parts_dir(out).glob("part-*")) == ["part-000000.safetensors",
                                                                     "part-000001.safetensors"]
    assert not out.exists()
    embedded.clear()
    monkeypatch.setattr(index_build, "make_embedder", counting)
    resumed = build_index(str(tiny_data / "train"), str(out), part_rows=4, batch_size=2, progress=False)
    assert sum(embedded) == 8  # parts 2 and 3 only
    assert not parts_dir(out).exists()
    fresh = build_index(str(tiny_data / "train"), str(tmp_path / "fresh"), progress=False)
    assert torch.equal(resumed.embeddings, fresh.embeddings)

    # parts of another data set (or other settings) are not reused
    monkeypatch.setattr(index_build, "make_embedder", lambda *a: counting(*a, crash_after=len(embedded) + 3))
    with pytest.raises(KeyboardInterrupt):
        build_index(str(tiny_data / "train"), str(tmp_path / "other"), part_rows=4, batch_size=2, progress=False,
                    resolution=8)
    embedded.clear()
    monkeypatch.setattr(index_build, "make_embedder", counting)
    build_index(str(tiny_data / "train"), str(tmp_path / "other"), part_rows=4, batch_size=2, progress=False)
    assert sum(embedded) == 16
    assert json.loads((tmp_path / "other" / "index.json").read_text())["resolution"] == 32


def test_dedup_on_two_processes_is_the_one_process_report(tmp_path, tiny_data):
    """The processes embed shares of whole batches (3 images: uneven shares of 16 rows), the main process groups."""
    args = ["dedup", str(tiny_data / "train"), "--batch-size", "3"]
    torchrun(*args, "--out", str(tmp_path / "two"))
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one, two = (json.loads((tmp_path / side / "report.json").read_text()) for side in ("one", "two"))
    assert one["summary"]["image_groups"] == 2
    for key in ("image_groups", "caption_groups_exact", "caption_groups_normalized", "n"):
        assert one[key] == two[key]
