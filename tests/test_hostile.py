"""Hostile input, one case a line: each gives exit code 2, exactly one `error:` line naming the file, line or
key (the expected fragments), no traceback, and writes nothing (the working directory is unchanged).

A case: id, argv (with {model}, {data}, {recipe}, {prompts}, {tmp} filled in), the fragments the error must
contain, and an optional setup function run first in the case's directory (the current directory)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import write_recipe
from PIL import Image

from trainer.cli import main
from trainer.config import load_recipe
from trainer.data import open_image
from trainer.io import write_manifest
from trainer.measure.features import embed_images
from trainer.recipe import TrainRecipe

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- setups (run in the case's directory)

Setup = Callable[[Path, Path], None]  # (the case's directory, the tiny model) -> None


def binary_file(name: str) -> Setup:
    return lambda tmp, model: (tmp / name).write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\x00binary")


def text_file(name: str, text: str) -> Setup:
    return lambda tmp, model: (tmp / name).write_text(text)


def model_copy(change: Callable[[Path], None]) -> Setup:
    """A copy of the tiny model at ./model, changed by `change`."""
    def setup(tmp: Path, model: Path) -> None:
        shutil.copytree(model, tmp / "model")
        change(tmp / "model")
    return setup


def empty_weights(model: Path) -> None:
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")


def garbage_weights(model: Path) -> None:
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 64)


def not_a_lora(tmp: Path, model: Path) -> None:
    safetensors.torch.save_file({"weight": torch.zeros(2, 2)}, tmp / "not_lora.safetensors")


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the pixel data is a stub)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def huge_png_in_data(tmp: Path, model: Path) -> None:
    first = json.loads((tmp / "data" / "metadata.jsonl").read_text().splitlines()[0])
    (tmp / "data" / first["file_name"]).write_bytes(png_header(20000, 20000))


def labelled(value: str) -> Setup:
    return text_file("labelled.jsonl", '{"text": "a small red circle", "label": 0}\n'
                                       f'{{"text": "a big blue square", "label": {value}}}\n')


ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def read_only_dir(tmp: Path, model: Path) -> None:
    """tmp/locked, a directory its user cannot write into: mode 555, or for root (who writes anywhere, CI
    included) the immutable attribute (`chattr +i`, ext4 and most Linux file systems; undone by `unlock`)."""
    (tmp / "locked").mkdir()
    if ROOT:
        subprocess.run(["chattr", "+i", str(tmp / "locked")], check=True, capture_output=True)
    else:
        (tmp / "locked").chmod(0o555)


def unlock(tmp: Path) -> None:
    if ROOT and (tmp / "locked").exists():
        subprocess.run(["chattr", "-i", str(tmp / "locked")], check=True, capture_output=True)


def earlier_output(command: str, folder: str, files: dict[str, str], after: dict[str, str] | None = None) -> Setup:
    """./folder as an earlier `memtrain COMMAND` output holding `files` (its manifest lists them), plus `after`:
    files put there later by the user."""
    def setup(tmp: Path, model: Path) -> None:
        for name, text in files.items():
            (tmp / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / folder / name).write_text(text)
        write_manifest(tmp / folder, command)
        for name, text in (after or {}).items():
            (tmp / folder / name).write_text(text)
    return setup


def folder_with(folder: str, **files: str) -> Setup:
    def setup(tmp: Path, model: Path) -> None:
        (tmp / folder).mkdir()
        for name, text in files.items():
            (tmp / folder / name.replace("_", ".")).write_text(text)
    return setup


def demo_copy(tmp: Path, model: Path) -> None:
    """./D as a copy of an earlier demo: report.json, the fine-tuned model in train/pipeline, the data in data/."""
    shutil.copytree(model, tmp / "D" / "train" / "pipeline")
    shutil.copytree(tmp / "data", tmp / "D" / "data")
    (tmp / "D" / "report.json").write_text("{}")


class Planted:
    """Unpickling this runs `touch PWNED` (the case's directory would change): a loader must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def planted_model_bin(model: Path) -> None:
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"weight": Planted()}, model / "unet" / "diffusion_pytorch_model.bin")


def checkpoint_with_planted(name: str) -> Setup:
    """A 2-step run in ./run whose checkpoint-2/NAME is a planted pickle."""
    def setup(tmp: Path, model: Path) -> None:
        assert main(["train", str(tmp / "recipe.yaml"), "output.dir=run", "train.max_steps=2",
                     "output.export=none"]) == 0
        torch.save({"state": Planted()}, tmp / "run" / "checkpoints" / "checkpoint-2" / name)
    return setup


def built_index(drop_rows: int = 0) -> Setup:
    """./idx: `memtrain index` of the case's data, or of a copy without its last `drop_rows` rows."""
    def setup(tmp: Path, model: Path) -> None:
        data = tmp / "data"
        if drop_rows:
            data = tmp / "other"
            shutil.copytree(tmp / "data", data)
            lines = (data / "metadata.jsonl").read_text().splitlines()[:-drop_rows]
            (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        assert main(["index", str(data), "--out", str(tmp / "idx"), "--no-progress"]) == 0
        if drop_rows:
            shutil.rmtree(data)
    return setup


def remove(part: str) -> Callable[[Path], None]:
    return lambda model: shutil.rmtree(model / part)


@dataclass
class Case:
    id: str
    argv: str
    expect: tuple[str, ...]
    setup: Setup | None = None


TRAIN = "train {recipe}"
GEN = "generate {model} --prompts {prompts} --out gen --steps 2"
EVAL = "evaluate {model} --prompts {prompts} --out eval --no-generate --detectors noise"
EDIT = "edit prune {model} --memorized {prompts} --out edited --steps 2"

CASES = [
    # ---- recipe values and files
    Case("adam-beta1", f"{TRAIN} train.adam_beta1=1.0", ("`train.adam_beta1`", "[0, 1)")),
    Case("adam-beta2", f"{TRAIN} train.adam_beta2=-0.1", ("`train.adam_beta2`", "[0, 1)")),
    Case("adam-eps", f"{TRAIN} train.adam_epsilon=0", ("`train.adam_epsilon`", "> 0")),
    Case("weight-decay", f"{TRAIN} train.adam_weight_decay=-0.1", ("`train.adam_weight_decay`", ">= 0")),
    Case("seed-negative", f"{TRAIN} train.seed=-1", ("`train.seed`", ">= 0")),
    Case("seed-huge", f"{TRAIN} train.seed=4294967296", ("`train.seed`", "2**32 - 1")),
    Case("resolution-negative", f"{TRAIN} data.resolution=-16", ("`data.resolution`", ">= 8")),
    Case("resolution-zero", f"{TRAIN} data.resolution=0", ("`data.resolution`",)),
    Case("resolution-not-vae-multiple", f"{TRAIN} data.resolution=33", ("`data.resolution`=33", "VAE factor 2", "34")),
    Case("noise-offset-negative", f"{TRAIN} train.noise_offset=-1", ("`train.noise_offset`", ">= 0")),
    Case("fp16-on-cpu", f"{TRAIN} train.mixed_precision=fp16", ("`train.mixed_precision=fp16`", "GPU", "bf16")),
    Case("validation-every-negative", f"{TRAIN} log.validation_every=-1", ("`log.validation_every`", ">= 0")),
    Case("allow-changes-unknown-key", f"{TRAIN} checkpoint.allow_changes=[train.lerning_rate]",
         ("`checkpoint.allow_changes`", "`train.learning_rate`")),
    Case("allow-changes-free-key", f"{TRAIN} checkpoint.allow_changes=[log.every_steps]",
         ("`checkpoint.allow_changes`", "'log.every_steps'", "may always change")),
    Case("allow-changes-fixed-key", f"{TRAIN} checkpoint.allow_changes=[model.lora.rank]",
         ("`checkpoint.allow_changes`", "model.lora.rank", "cannot change")),
    Case("workers-negative", f"{TRAIN} train.dataloader_num_workers=-1", ("`train.dataloader_num_workers`",)),
    Case("validation-images-zero", f"{TRAIN} log.validation_images=0", ("`log.validation_images`", ">= 1")),
    Case("max-samples-negative", f"{TRAIN} data.max_samples=-1", ("`data.max_samples`", ">= 1")),
    Case("lora-alpha-negative", f"{TRAIN} model.lora.alpha=-4", ("`model.lora.alpha`",)),
    Case("warmup-negative", f"{TRAIN} train.lr_warmup_steps=-1", ("`train.lr_warmup_steps`",)),
    Case("grad-norm-negative", f"{TRAIN} train.max_grad_norm=-1", ("`train.max_grad_norm`",)),
    Case("snr-gamma-zero", f"{TRAIN} train.snr_gamma=0", ("`train.snr_gamma`", "> 0")),
    Case("snr-gamma-negative", f"{TRAIN} train.snr_gamma=-5", ("`train.snr_gamma`",)),
    Case("override-malformed", f"{TRAIN} train.max_steps=[1", ("command line", "train.max_steps=[1")),
    Case("override-bad-choice", f"{TRAIN} train.mixed_precision=fp8", ("command line", "`train.mixed_precision`")),
    Case("override-unknown-key", f"{TRAIN} train.lerning_rate=1", ("command line", "`train.learning_rate`")),
    Case("override-not-key-value", f"{TRAIN} train.max_steps", ("command line", "key.sub=value")),
    Case("recipe-binary", "train bin.yaml", ("bin.yaml", "not UTF-8"), binary_file("bin.yaml")),
    Case("recipe-control-characters", "train ctl.yaml", ("ctl.yaml, line 2", "'\\x00'"),
         text_file("ctl.yaml", "train:\n  max_steps: \x00\x01\n")),
    Case("recipe-directory", "train {tmp}", ("is a directory",)),
    Case("extends-directory", "train ext.yaml", ("ext.yaml", "`extends: .`", "is a directory"),
         text_file("ext.yaml", "extends: .\n")),
    # ---- output directory: found before the model is loaded
    Case("output-is-file", f"{TRAIN} output.dir=afile", ("output.dir", "afile", "not a directory"),
         text_file("afile", "x")),
    Case("output-under-file", f"{TRAIN} output.dir=afile/run", ("output.dir", "afile", "not a directory"),
         text_file("afile", "x")),
    Case("output-read-only-fs", f"{TRAIN} output.dir=/sys/memtrain-run", ("output.dir", "/sys", "cannot write")),
    Case("output-unwritable", f"{TRAIN} output.dir=locked/run", ("output.dir", "locked", "cannot write"),
         read_only_dir),
    # ---- model directory
    Case("export-pipeline-without-model-index", f"{TRAIN} model.pretrained=model output.export=pipeline",
         ("model_index.json", "output.export"), model_copy(lambda m: (m / "model_index.json").unlink())),
    Case("empty-weight-file-train", f"{TRAIN} model.pretrained=model",
         ("diffusion_pytorch_model.safetensors", "0 bytes"), model_copy(empty_weights)),
    Case("empty-weight-file-generate", GEN.replace("{model}", "model"),
         ("diffusion_pytorch_model.safetensors", "0 bytes"), model_copy(empty_weights)),
    Case("garbage-weight-file-train", f"{TRAIN} model.pretrained=model",
         ("diffusion_pytorch_model.safetensors",), model_copy(garbage_weights)),
    Case("garbage-weight-file-generate", GEN.replace("{model}", "model"),
         ("diffusion_pytorch_model.safetensors",), model_copy(garbage_weights)),
    # ---- images
    Case("png-bomb", TRAIN, ("metadata.jsonl, line 1", "400000000 pixels", "resize"), huge_png_in_data),
    # ---- devices
    Case("evaluate-cuda", f"{EVAL} --device cuda", ("--device cuda", "CUDA")),
    Case("edit-cuda", f"{EDIT} --device cuda", ("--device cuda", "CUDA")),
    Case("dedup-cuda", "dedup {data} --out report --device cuda", ("--device cuda", "CUDA")),
    Case("index-cuda", "index {data} --out index --device cuda", ("--device cuda", "CUDA")),
    Case("evaluate-bad-device", f"{EVAL} --device gpu9", ("--device gpu9",)),
    # ---- LoRA files
    Case("generate-lora-empty-file", f"{GEN} --lora empty.safetensors", ("empty.safetensors", "0 bytes"),
         text_file("empty.safetensors", "")),
    Case("generate-lora-not-lora", f"{GEN} --lora not_lora.safetensors", ("not_lora.safetensors", "LoRA"), not_a_lora),
    Case("generate-lora-empty-dir", f"{GEN} --lora lora_dir", ("lora_dir", "pytorch_lora_weights.safetensors"),
         lambda tmp, model: (tmp / "lora_dir").mkdir()),
    Case("evaluate-lora-empty-file", f"{EVAL} --lora empty.safetensors", ("empty.safetensors", "0 bytes"),
         text_file("empty.safetensors", "")),
    Case("evaluate-lora-not-lora", f"{EVAL} --lora not_lora.safetensors", ("not_lora.safetensors", "LoRA"), not_a_lora),
    Case("evaluate-lora-empty-dir", f"{EVAL} --lora lora_dir", ("lora_dir", "pytorch_lora_weights.safetensors"),
         lambda tmp, model: (tmp / "lora_dir").mkdir()),
    Case("edit-lora-empty-file", f"{EDIT} --lora empty.safetensors", ("empty.safetensors", "0 bytes"),
         text_file("empty.safetensors", "")),
    Case("edit-lora-not-lora", f"{EDIT} --lora not_lora.safetensors", ("not_lora.safetensors", "LoRA"), not_a_lora),
    # ---- generate / evaluate arguments and prompt files
    Case("generate-n-negative", f"{GEN} -n -1", ("-n must be >= 1",)),
    Case("generate-out-cwd", "generate {model} --prompts {prompts} --out . --steps 2", ("--out .", "choose another --out")),
    Case("generate-prompts-latin1", "generate {model} --prompts latin1.txt --out gen", ("latin1.txt", "not UTF-8"),
         lambda tmp, model: (tmp / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")),
    Case("evaluate-prompts-latin1", EVAL.replace("{prompts}", "latin1.txt"), ("latin1.txt", "not UTF-8"),
         lambda tmp, model: (tmp / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")),
    Case("label-true", EVAL.replace("{prompts}", "labelled.jsonl"), ("labelled.jsonl, line 2", "`label`"),
         labelled("true")),
    Case("label-string", EVAL.replace("{prompts}", "labelled.jsonl"), ("labelled.jsonl, line 2", "`label`"),
         labelled('"1"')),
    Case("label-two", EVAL.replace("{prompts}", "labelled.jsonl"), ("line 2", "`label`", "0 or 1"), labelled("2")),
    Case("label-half", EVAL.replace("{prompts}", "labelled.jsonl"), ("line 2", "`label`", "0 or 1"), labelled("0.5")),
    # ---- no command writes into its input directory
    Case("dedup-out-is-data", "dedup {data} --out {data}", ("--out", "inside the input", "DATA")),
    Case("dedup-out-inside-data", "dedup {data} --out {data}/report", ("--out", "inside the input")),
    Case("index-out-inside-data", "index {data} --out {data}/index", ("--out", "overlaps the training data")),
    Case("evaluate-out-inside-train-data", f"{EVAL} --train-data {{data}}".replace("--out eval", "--out {data}/eval"),
         ("--out", "inside the input", "--train-data")),
    Case("train-output-inside-data", f"{TRAIN} output.dir={{data}}/run", ("output.dir", "inside the input data.path")),
    Case("generate-out-inside-checkpoint", GEN.replace("--out gen", "--out {model}/gen"), ("--out", "inside the input")),
    Case("evaluate-out-inside-checkpoint", EVAL.replace("--out eval", "--out {model}/eval"),
         ("--out", "inside the input")),
    # ---- an output folder is replaced only when it holds nothing but the command's own earlier output, and
    # never when an input lies in it (trainer.io.check_replaceable)
    Case("evaluate-out-holds-its-model", "evaluate D/train/pipeline --prompts {prompts} --data D/data --out D "
         "--no-generate --detectors noise", ("--out D", "holds the input CHECKPOINT"), demo_copy),
    Case("evaluate-out-holds-its-prompts", "evaluate {model} --prompts E/p.jsonl --out E --no-generate "
         "--detectors noise", ("--out E", "holds the input --prompts"),
         earlier_output("evaluate", "E", {"report.json": "{}", "p.jsonl": '{"text": "a small red circle"}\n'})),
    Case("generate-out-holds-its-prompts", "generate {model} --prompts G/my.txt --out G --steps 2",
         ("--out G", "holds the input --prompts"),
         earlier_output("generate", "G", {"generations.jsonl": "{}\n", "my.txt": "a small red circle\n"})),
    Case("generate-out-holds-a-later-file", "generate {model} --prompts {prompts} --out G --steps 2",
         ("--out G", "notes.txt", "did not write"),
         earlier_output("generate", "G", {"generations.jsonl": "{}\n"}, after={"notes.txt": "mine"})),
    Case("generate-out-without-manifest", "generate {model} --prompts {prompts} --out G --steps 2",
         ("--out G", "generations.jsonl", ".memtrain-manifest.json"), folder_with("G", generations_jsonl="{}\n")),
    Case("evaluate-out-of-generate", EVAL.replace("--out eval", "--out G"), ("--out G", "`memtrain generate`"),
         earlier_output("generate", "G", {"generations.jsonl": "{}\n"})),
    Case("edit-out-holds-its-lora", "edit uce {model} --memorized {prompts} --lora A/pytorch_lora_weights.safetensors "
         "--out A", ("--out A", "holds the input --lora"),
         earlier_output("edit", "A", {"edit.json": '{"tool": "memtrain edit"}', "pytorch_lora_weights.safetensors": "x"})),
    Case("toy-data-out-holds-other-files", "toy-data T --n-duplicated 1 --copies 2 --n-singletons 1 --n-heldout 1 "
         "--n-novel 1", ("OUT T", "keep.txt"), folder_with("T", keep_txt="mine")),
    Case("dedup-out-holds-other-files", "dedup {data} --out R", ("--out R", "keep.txt"), folder_with("R", keep_txt="mine")),
    Case("index-out-holds-other-files", "index {data} --out I --no-progress", ("--out I", "keep.txt"),
         folder_with("I", keep_txt="mine")),
    Case("train-model-in-its-export", f"{TRAIN} model.pretrained=run/pipeline output.dir=run output.overwrite=true",
         ("output.dir run", "model.pretrained", "run/pipeline"),
         lambda tmp, model: shutil.copytree(model, tmp / "run" / "pipeline")),
    # ---- indexes
    Case("evaluate-index-threshold-2", f"{EVAL} --index idx --index-threshold 2", ("--index-threshold", "(-1, 1)"),
         built_index()),
    Case("evaluate-index-threshold-minus-1", f"{EVAL} --index idx --index-threshold=-1",
         ("--index-threshold", "(-1, 1)"), built_index()),
    Case("evaluate-index-of-other-data", f"{EVAL} --index idx --train-data {{data}}",
         ("--index idx", "another data set", "--train-data DATA"), built_index(drop_rows=1)),
    Case("index-resolution-huge", "index {data} --out idx --resolution 100000", ("--resolution", "4096")),
    # ---- planted pickles, missing model folders
    Case("model-bin-pickle", GEN.replace("{model}", "model"), ("diffusion_pytorch_model.bin", "refused"),
         model_copy(planted_model_bin)),
    Case("resume-pickled-optimizer", f"{TRAIN} output.dir=run checkpoint.resume=latest", ("optimizer.bin", "refused"),
         checkpoint_with_planted("optimizer.bin")),
    Case("resume-pickled-scheduler", f"{TRAIN} output.dir=run checkpoint.resume=latest", ("scheduler.bin", "refused"),
         checkpoint_with_planted("scheduler.bin")),
    Case("edit-prune-no-tokenizer", EDIT.replace("{model}", "model"), ("tokenizer/",), model_copy(remove("tokenizer"))),
    Case("generate-no-vae", GEN.replace("{model}", "model"), ("vae/",), model_copy(remove("vae"))),
    Case("train-no-vae", f"{TRAIN} model.pretrained=model", ("vae/",), model_copy(remove("vae"))),
    # ---- toy data
    Case("toy-data-nothing-to-find", "toy-data toy --n-duplicated 0", ("--n-duplicated", "nothing")),
    Case("toy-data-one-copy", "toy-data toy --copies 1", ("--copies", ">= 2")),
]


@pytest.fixture
def case_dir(tmp_path, monkeypatch, tiny_model, tiny_data):
    """The case's directory (also the current one): a copy of the tiny data set, a recipe, a prompt file."""
    shutil.copytree(tiny_data / "train", tmp_path / "data")
    write_recipe(tmp_path / "recipe.yaml", tiny_model, tmp_path / "data", tmp_path / "out")
    (tmp_path / "prompts.txt").write_text("a small red circle\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_hostile_input(case: Case, case_dir: Path, tiny_model: Path, capsys):
    if case.setup is not None:
        case.setup(case_dir, tiny_model)
    model_before = tree(tiny_model)
    before = tree(case_dir)
    values = dict(model=tiny_model, data=case_dir / "data", recipe=case_dir / "recipe.yaml",
                  prompts=case_dir / "prompts.txt", tmp=case_dir)
    argv = [part.format(**values) for part in case.argv.split()]
    try:
        code = main(argv)
    finally:
        unlock(case_dir)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    for fragment in case.expect:
        assert fragment.format(**values).replace("DATA", str(values["data"])) in err, (fragment, err)
    assert tree(case_dir) == before, "something was written"
    assert tree(tiny_model) == model_before


# ---------------------------------------------------------------- legal input read right


def test_command_line_overrides_are_typed_by_the_field(tmp_path, tiny_model, tiny_data):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "out")
    r = load_recipe(TrainRecipe, recipe, ["train.mixed_precision=no", "log.run_name=007", "model.revision=1.0",
                                          "data.split=no", "train.max_steps=12", "model.lora.target_modules=[to_k]",
                                          "model.variant=null", "data.image_column='image'"])
    assert (r.train.mixed_precision, r.log.run_name, r.model.revision, r.data.split) == ("no", "007", "1.0", "no")
    assert (r.train.max_steps, r.model.lora.target_modules, r.model.variant) == (12, ["to_k"], None)
    assert r.data.image_column == "image"


def gray16(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array.astype(np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I"), im.mode
    return path


def test_16_bit_grayscale_pngs_are_scaled_to_8_bits(tmp_path):
    """16-bit PNGs used to turn pure white in convert("RGB"); now 65535 -> 255, and two different ones are
    not near-duplicates."""
    ramp = np.tile(np.linspace(0, 65535, 16), (16, 1))
    a = gray16(tmp_path / "a.png", ramp)
    b = gray16(tmp_path / "b.png", ramp[:, ::-1])
    image = np.asarray(open_image(a, "a.png"))
    assert image.shape == (16, 16, 3) and image[0, 0].tolist() == [0, 0, 0] and image[0, -1].tolist() == [255] * 3
    assert np.allclose(image[0, :, 0], np.linspace(0, 255, 16), atol=1)
    emb = embed_images([a, b], ["a.png", "b.png"], "pixels", progress=False)
    assert float(emb[0] @ emb[1]) < 0.9
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a ramp"}\n'
                                             '{"file_name": "b.png", "text": "a reversed ramp"}\n')
    assert main(["dedup", str(tmp_path), "--out", str(tmp_path.parent / "report")]) == 0
    report = json.loads((tmp_path.parent / "report" / "report.json").read_text())
    assert report["summary"]["image_groups"] == 0


def assert_no_library_warnings(tmp_path: Path, *argv: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    run = subprocess.run([sys.executable, "-m", "trainer.cli", *argv], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr
    for line in run.stderr.splitlines():
        assert "warning" not in line.lower() and "float32" not in line, (argv[0], line)


def test_generate_leaks_no_library_warnings(tmp_path, tiny_model):
    """diffusers' `torch_dtype` FutureWarning and transformers' torchvision fallback notice used to reach
    every user."""
    (tmp_path / "p.txt").write_text("a small red circle\n")
    assert_no_library_warnings(tmp_path, "generate", str(tiny_model), "--prompts", "p.txt", "--out", "g",
                               "--steps", "2")


@pytest.mark.slow
def test_train_and_evaluate_leak_no_library_warnings(tmp_path, tiny_model, tiny_data):
    """train used to print diffusers' AutoencoderKL "should be kept in float32" notice (vae.to(dtype=...))."""
    (tmp_path / "p.txt").write_text("a small red circle\n")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, tiny_data / "train", tmp_path / "run",
                          train={"max_steps": 1}, output={"export": "none"})
    assert_no_library_warnings(tmp_path, "train", str(recipe))
    assert_no_library_warnings(tmp_path, "evaluate", str(tiny_model), "--prompts", "p.txt", "--out", "e",
                               "--steps", "2", "-n", "1", "--detectors", "noise")
