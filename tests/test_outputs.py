"""Beside tests/test_hostile.py: legal input read right and failures that need a real process. The output
rule (an output folder is replaced only when its manifest says this command wrote everything in it), the
index's data fingerprint and second neighbour, byte-order marks in metadata, full disks during `index` and
`edit`, and resume through another spelling of the model path."""

from __future__ import annotations

import contextlib
import io
import json
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import write_recipe

from trainer.cli import main
from trainer.data import image_to_tensor, load_rows, open_image
from trainer.io import MANIFEST, MemtrainError, check_replaceable, claim_output, output_files, read_manifest
from trainer.measure.embedders import make_embedder
from trainer.measure.index import INDEX_FILE, TrainingIndex
from trainer.measure.index_data import check_index_data, fingerprint_of
from trainer.report.guard_sections import index_replication


def quiet(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def index_dir(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "idx"
    assert quiet(["index", tiny_data / "train", "--out", out, "--no-progress", "--resolution", "16"]) == 0  # the tiny model's
    return out


# ---------------------------------------------------------------- the output rule


def test_a_command_replaces_its_own_earlier_output_and_nothing_else(tmp_path, tiny_model):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a small red circle\na big blue square\n")
    out = tmp_path / "gen"
    assert quiet(["generate", tiny_model, "--prompts", prompts, "--out", out, "--steps", "2"]) == 0
    manifest = read_manifest(out)
    assert manifest["command"] == "generate"
    assert manifest["files"] == output_files(out) == ["00000.png", "00001.png", "generations.jsonl"]
    # a second run (other prompts) replaces the first: no stale image of it is left
    prompts.write_text("a small red circle\n")
    assert quiet(["generate", tiny_model, "--prompts", prompts, "--out", out, "--steps", "2"]) == 0
    assert output_files(out) == ["00000.png", "generations.jsonl"]
    # another command's output, a user's file in a sub-folder: refused, named
    with pytest.raises(MemtrainError, match="`memtrain generate`, not of `memtrain evaluate`"):
        check_replaceable(out, "evaluate")
    (out / "sub").mkdir()
    (out / "sub" / "mine.txt").write_text("mine")
    with pytest.raises(MemtrainError, match="sub/mine.txt"):
        check_replaceable(out, "generate")


def test_toy_data_keeps_a_users_files_and_replaces_its_own(tmp_path):
    out = tmp_path / "toy"
    argv = ["toy-data", out, "--n-duplicated", "1", "--copies", "2", "--n-singletons", "1", "--n-heldout", "1",
            "--n-novel", "1"]
    assert quiet(argv) == 0
    first = output_files(out)
    assert "labels.jsonl" in first and read_manifest(out)["files"] == first
    assert quiet(argv + ["--seed", "5"]) == 0  # an earlier toy data set is replaced
    assert output_files(out) == first
    (out / "notes.txt").write_text("mine")
    assert main([str(a) for a in argv]) == 2
    assert (out / "notes.txt").read_text() == "mine" and output_files(out) == sorted(first + ["notes.txt"])


def test_a_claimed_folder_owns_its_sub_folders_and_an_interrupted_run_is_replaceable(tmp_path):
    """demo and compare write as they go: the manifest written first names their folders ("data/")."""
    out = claim_output(tmp_path / "demo", "demo", ["data/", "report.json"], {})
    (out / "data" / "train").mkdir(parents=True)
    (out / "data" / "train" / "a.png").write_bytes(b"x")  # interrupted here
    check_replaceable(out, "demo")
    (out / "mine.txt").write_text("mine")
    with pytest.raises(MemtrainError, match="mine.txt"):
        check_replaceable(out, "demo")
    with pytest.raises(MemtrainError, match="holds the input --base"):
        check_replaceable(tmp_path, "demo", {"--base": out / "data" / "train"})
    assert MANIFEST not in output_files(out)


# ---------------------------------------------------------------- indexes


def test_an_index_records_its_data_and_evaluate_checks_it(index_dir, tiny_data, tmp_path, capsys):
    recorded = json.loads((index_dir / INDEX_FILE).read_text())["meta"]["fingerprint"]
    assert recorded == fingerprint_of(tiny_data / "train") and recorded["count"] == 16
    check_index_data(index_dir, tiny_data / "train")  # the same data: no word
    assert capsys.readouterr().err == ""
    # one image changed in size (another file of the same name): refused, naming both
    other = tmp_path / "other"
    shutil.copytree(tiny_data / "train", other)
    first = json.loads((other / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    with open(other / first, "ab") as f:
        f.write(b"\0")
    with pytest.raises(MemtrainError, match="both 16 images, but other file names or sizes") as e:
        check_index_data(index_dir, other)
    assert str(index_dir) in str(e.value) and str(other) in str(e.value)
    # an index of an older memtrain: a warning, no error
    old = tmp_path / "old"
    shutil.copytree(index_dir, old)
    info = json.loads((old / INDEX_FILE).read_text())
    del info["meta"]["fingerprint"]
    (old / INDEX_FILE).write_text(json.dumps(info))
    check_index_data(old, other)
    err = capsys.readouterr().err
    assert "warning" in err and "no fingerprint" in err and str(old) in err


def test_second_similarity_skips_exact_copies_of_the_nearest(index_dir, tiny_data):
    """The tiny data holds 2 images x 4 identical copies: the second neighbour of a copy is another image."""
    index = TrainingIndex.load(index_dir)
    labels = [json.loads(line) for line in (tiny_data / "labels.jsonl").read_text().splitlines()]
    duplicated = [r for r in labels if r["group"] == "duplicated"][0]
    single = [r for r in labels if r["group"] == "singleton"][0]
    images = torch.cat([(image_to_tensor(open_image(tiny_data / r["file_name"], r["file_name"]), index.resolution,
                                         True, False, None)[None] + 1) / 2 for r in (duplicated, single)])
    section = index_replication(images, ["duplicated", "singleton"], [duplicated["text"], single["text"]], index,
                                make_embedder("pixels"), 0.85)
    copies = index.copy_ids()
    for row in section["generations"]:
        j = row["nearest_index"]
        others = [i for i in range(len(index)) if copies[i] != copies[j]]
        query = make_embedder("pixels")(images[section["generations"].index(row)][None])
        expected = float((torch.nn.functional.normalize(query.float(), dim=1)
                          @ index.embeddings[others].float().T).max())
        assert row["similarity"] > 0.999 and row["second_similarity"] == pytest.approx(expected, abs=1e-6)
        assert row["second_similarity"] < 0.999
    assert int((copies == copies[section["generations"][0]["nearest_index"]]).sum()) == 4


def test_generate_and_evaluate_say_when_they_ignore_an_index(index_dir, tiny_model, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a small red circle\n")
    assert quiet(["generate", tiny_model, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "g", "--steps", "2",
                  "--index", index_dir]) == 0
    err = capsys.readouterr().err
    assert f"warning: --index {index_dir} is unused without --guard amg" in err and err.count("--index") == 1
    assert quiet(["evaluate", tiny_model, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "e", "--no-generate",
                  "--detectors", "noise", "--index", index_dir]) == 0
    assert f"warning: --index {index_dir} measures the replication of generations" in capsys.readouterr().err


# ---------------------------------------------------------------- metadata with a byte-order mark


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_metadata_with_a_byte_order_mark_is_read(tiny_data, tmp_path, kind):
    data = tmp_path / "data"
    shutil.copytree(tiny_data / "train", data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    (data / "metadata.jsonl").unlink()
    if kind == "csv":
        text = "file_name,text\n" + "".join(f"{r['file_name']},{r['text']}\n" for r in rows)
    else:
        text = "".join(json.dumps(r) + "\n" for r in rows)
    (data / f"metadata.{kind}").write_bytes(b"\xef\xbb\xbf" + text.encode())
    loaded = load_rows(str(data))
    assert [c[0] for c in loaded.captions] == [r["text"] for r in rows]
    assert [Path(p).name for p in loaded.images] == [Path(r["file_name"]).name for r in rows]


# ---------------------------------------------------------------- full disks


@contextlib.contextmanager
def file_size_limit(limit: int):
    """A real write failure in this process: files may not grow past `limit` bytes (EFBIG, not SIGXFSZ)."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def assert_one_write_error(argv: list, command: str, out: Path, limit: int, capsys) -> None:
    """One line naming the output and the failure; nothing partial left (safetensors removes its own file)."""
    capsys.readouterr()
    with file_size_limit(limit):
        code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and err.count(f"memtrain {command}: error:") == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"memtrain {command}: error: writing into {out} failed") and "File too large" in last, last
    assert f"nothing was written to {out}: free disk space" in last, last
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_a_full_disk_during_index_is_one_clear_error(tiny_data, tmp_path, capsys):
    out = tmp_path / "idx"
    assert_one_write_error(["index", tiny_data / "train", "--out", out, "--no-progress"], "index", out, 2000, capsys)


def test_a_full_disk_during_edit_is_one_clear_error(tiny_model, tmp_path, capsys):
    (tmp_path / "mem.txt").write_text("a small red circle\n")
    out = tmp_path / "edited"
    limit = (tiny_model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size // 2
    assert_one_write_error(["edit", "uce", tiny_model, "--memorized", tmp_path / "mem.txt", "--out", out], "edit",
                           out, limit, capsys)


# ---------------------------------------------------------------- resume through another spelling of the path


def test_resume_accepts_the_same_model_through_a_trailing_slash_or_a_symlink(tiny_model, tiny_data, tmp_path):
    (tmp_path / "link").symlink_to(tiny_model)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "run",
                          output={"export": "none"})
    assert quiet(["train", recipe, "train.max_steps=2"]) == 0
    assert quiet(["train", recipe, "train.max_steps=4", "checkpoint.resume=latest",
                  f"model.pretrained={tiny_model}/"]) == 0
    assert quiet(["train", recipe, "train.max_steps=6", "checkpoint.resume=latest",
                  f"model.pretrained={tmp_path / 'link'}"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-6").is_dir()
    # another model is still refused
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    assert main(["train", str(recipe), "train.max_steps=8", "checkpoint.resume=latest",
                 f"model.pretrained={other}"]) == 2
