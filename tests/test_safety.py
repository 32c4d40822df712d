"""Issue 21: nothing lost, nothing injected. One test (or one parametrised family) per root cause of the adversarial
trial: outputs that alias inputs, user text read as Rich markup, interrupted and concurrent writes, sizes checked
before allocation, bounded inputs, one-line errors, and runs that used to end silently wrong."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cli_helpers import assert_one_line_error, run

REPO = Path(__file__).resolve().parents[1]


# ---- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A one-epoch mlp on decoy digits (its numbers do not matter here), an image folder of the val split, a run
    folder written by evaluate, and a hand-made neuron feedback file."""
    root = tmp_path_factory.mktemp("safety")
    model = root / "m.safetensors"
    result = run("train", "--arch", "mlp", "--data", "decoy-digits:train", "--epochs", "1", "-o", model)
    assert result.exit_code == 0, result.stderr
    folder = root / "imgs"
    assert run("data", "make", "decoy-digits", "--split", "val", "-o", folder).exit_code == 0
    folder = folder / "val"
    runs = root / "run"
    assert run("evaluate", model, "--data", folder, "-o", runs).exit_code == 0
    feedback = root / "fb.csv"
    feedback.write_text("layer,channel,verdict\nfc1,0,no\n")
    return {"root": root, "model": model, "folder": folder, "run": runs, "feedback": feedback}


def digest(path: Path):
    """The bytes of a file, or of every file under a folder, as sha256 (None when absent)."""
    path = Path(path)
    if path.is_dir():
        return sorted((str(f.relative_to(path)), hashlib.sha256(f.read_bytes()).hexdigest())
                      for f in path.rglob("*") if f.is_file())
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def with_card(env, target: Path, edit) -> Path:
    """A copy of the env model whose card (embedded and sidecar) `edit` changed."""
    with safe_open(str(env["model"]), framework="pt") as handle:
        meta = handle.metadata()
    card = json.loads(meta["modelfix.card"])
    edit(card)
    save_file(load_file(str(env["model"])), str(target), metadata={**meta, "modelfix.card": json.dumps(card)})
    target.with_name(target.stem + ".card.json").write_text(json.dumps(card))
    return target


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid PNG header claiming side×side pixels (400 M at 20000): a decompression bomb, a few bytes on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


# ---- 1. an output that aliases an input, for every writing command -------------------------------------------------


def _side_pt(env, tmp):
    side = tmp / "side"
    side.mkdir()
    torch.save(load_file(str(env["model"])), side / "model.pt")
    shutil.copy(env["model"].with_name("m.card.json"), side / "model.card.json")
    return side


def _bundle(env, tmp):
    from modelfix.data import load_data, save_bundle

    return save_bundle(load_data(str(env["folder"])), tmp / "bundle.safetensors")


def _foreign_report(env, tmp):
    (tmp / "rep").mkdir()
    (tmp / "rep" / "report.md").write_text("my notes\n")
    return tmp / "rep"


def _hand_csv(env, tmp):
    (tmp / "neurons.csv").write_text("channel,verdict\n0,yes\n")
    return tmp / "neurons.csv"


# (name, guarded input or a builder of one, argv builder, fragment of the error)
ALIASES = [
    ("annotate -o TEACHER", "model", lambda e, t, g: ["annotate", e["model"], "--data", e["folder"], "-o", e["model"]],
     "refusing"),
    ("annotate -o ./x/../TEACHER", "model", lambda e, t, g: [
        "annotate", e["model"], "--data", e["folder"], "-o", e["model"].parent / "x" / ".." / e["model"].name], "refusing"),
    ("refit -o the .pt input's sidecar", _side_pt, lambda e, t, g: [
        "refit", g / "model.pt", "--clean-dir", e["folder"], "-o", g / "model.safetensors"], "card"),
    ("evaluate --data imgs -o imgs", "folder", lambda e, t, g: ["evaluate", e["model"], "--data", g, "-o", g],
     "refusing"),
    ("prune-egem -o input", "model", lambda e, t, g: ["prune-egem", g, "--clean-dir", e["folder"], "-o", g], "refusing"),
    ("finetune -o input", "model", lambda e, t, g: ["finetune", g, "--method", "erm", "--data", e["folder"], "-o", g],
     "refusing"),
    ("prune-crayon -o input", "model", lambda e, t, g: [
        "prune-crayon", g, "--feedback", e["feedback"], "--data", e["folder"], "-o", g], "refusing"),
    ("train -o its data bundle", _bundle, lambda e, t, g: ["train", "--arch", "mlp", "--data", g, "-o", g], "refusing"),
    ("train -o the --config sidecar's checkpoint", "model", lambda e, t, g: [
        "train", "--config", g.with_name("m.card.json"), "--data", e["folder"], "-o", g], "refusing"),
    ("rerun OUT -o OUT", "model", lambda e, t, g: ["rerun", g, "-o", g], "refusing"),
    ("feedback simulate over a hand-filled CSV", _hand_csv, lambda e, t, g: [
        "feedback", "simulate", e["model"], "--data", e["folder"], "-o", g], "--overwrite"),
    ("evaluate -o a folder with someone's report.md", _foreign_report, lambda e, t, g: [
        "evaluate", e["model"], "--data", e["folder"], "-o", g], "--overwrite"),
    ("explain -o inside the data", "folder", lambda e, t, g: ["explain", e["model"], "--data", g, "-o", g / "ex"],
     "refusing"),
    ("feedback gallery -o inside the data", "folder", lambda e, t, g: [
        "feedback", "gallery", e["model"], "--data", g, "-o", g / "gal"], "refusing"),
    ("feedback saliency -o inside the data", "folder", lambda e, t, g: [
        "feedback", "saliency", e["model"], "--data", g, "-o", g / "sal"], "refusing"),
    ("data make -o inside --data-root", "folder", lambda e, t, g: [
        "data", "make", "decoy-digits", "--data-root", g, "-o", g / "made"], "refusing"),
    ("discover -o inside the data", "folder", lambda e, t, g: ["discover", e["model"], "--data", g, "-o", g / "d"],
     "refusing"),
    ("compare -o inside the data", "folder", lambda e, t, g: ["compare", e["model"], "--data", g, "-o", g / "c"],
     "refusing"),
    ("report -o inside a run", "run", lambda e, t, g: ["report", g, "-o", g / "cmp"], "refusing"),
]


@pytest.mark.parametrize("name,guarded,argv,fragment", ALIASES, ids=[a[0] for a in ALIASES])
def test_output_aliasing_an_input_is_refused_and_the_input_is_unchanged(env, tmp_path, name, guarded, argv, fragment):
    target = env[guarded] if isinstance(guarded, str) else guarded(env, tmp_path)
    watched = [target, target.with_name(target.stem + ".card.json")] if target.is_file() else [target]
    before = [digest(p) for p in watched]
    assert_one_line_error(run(*argv(env, tmp_path, target)), fragment)
    assert [digest(p) for p in watched] == before
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")], "a hidden temporary was left"


# ---- 2. user text is never Rich markup -----------------------------------------------------------------------------


def test_bracketed_names_print_literally_in_one_line_errors(env):
    assert_one_line_error(run("evaluate", env["model"], "--data", "[/bold]"), "'[/bold]'")
    assert_one_line_error(run("inspect", "x[/red].safetensors"), "x[/red].safetensors")
    result = run("evaluate", env["model"], "--data", env["folder"], "--artifact", "[/x]", "--json")
    assert_one_line_error(result, "'[/x]'")
    assert json.loads(result.stdout)["error"]["exit_code"] == 2


def test_a_class_name_with_link_markup_prints_literally(env, tmp_path):
    link = "[link=file:///etc/passwd]c{}[/link]"

    def edit(card):
        card["class_names"] = [link.format(i) for i in range(10)]

    model = with_card(env, tmp_path / "link.safetensors", edit)
    inspected = run("inspect", model)
    assert inspected.exit_code == 0, inspected.stderr
    assert link.format(0) in inspected.stdout
    # a table: evaluate's title names the model file, here one whose name is a Rich style tag
    styled = tmp_path / "[red]x.safetensors"
    shutil.copy(model, styled)
    shutil.copy(tmp_path / "link.card.json", tmp_path / "[red]x.card.json")
    table = run("evaluate", styled, "--data", "decoy-digits:val", "--poison", "0")
    assert table.exit_code == 0, table.stderr
    assert "[red]x.safetensors" in table.stdout


def test_a_corrupt_image_with_brackets_in_its_path_is_named_literally(env, tmp_path):
    scans = tmp_path / "scans [old]"
    (scans / "0").mkdir(parents=True)
    shutil.copy(next((env["folder"] / "images" / "0").iterdir()), scans / "0" / "good.png")
    (scans / "0" / "img [copy].png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    assert_one_line_error(run("evaluate", env["model"], "--data", scans), "scans [old]/0/img [copy].png")


# ---- 3. a staged write interrupted by SIGINT or SIGTERM ----------------------------------------------------------


def test_a_signal_mid_run_leaves_no_output_and_no_temporary(tmp_path):
    procs = {}
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        folder = tmp_path / sig.name
        folder.mkdir()
        cmd = [sys.executable, "-m", "modelfix", "train", "--arch", "mlp", "--data", "decoy-digits:train",
               "--epochs", "100", "-o", "out.safetensors", "--report", "rep"]
        env = {k: v for k, v in os.environ.items() if k != "MODELFIX_NO_PROGRESS"}  # the epoch lines say when
        procs[sig] = (subprocess.Popen(cmd, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                       env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}), folder, code)
    for sig, (proc, folder, code) in procs.items():
        for line in proc.stderr:  # the first epoch line: training is under way
            if "epoch" in line:
                break
        proc.send_signal(sig)
        proc.communicate(timeout=60)
        assert proc.returncode == code, sig
        assert list(folder.iterdir()) == [], (sig, list(folder.iterdir()))


def test_demo_write_is_staged(env, tmp_path, monkeypatch):
    import modelfix.report_html
    from modelfix.checkpoint import load_model
    from modelfix.demo import write_demo

    model, card = load_model(env["model"])
    out = tmp_path / "demo"
    out.mkdir()
    (out / "results.json").write_text('{"schema": "modelfix.demo/v1"}')  # an earlier demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("modelfix.demo.render_markdown", lambda results: "# demo\n")
    monkeypatch.setattr(modelfix.report_html, "render_demo_html", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_demo(out, {"rows": []}, model, card)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no staged sibling left
    assert [p.name for p in out.iterdir()] == ["results.json"]  # the earlier demo as it was
    monkeypatch.setattr(modelfix.report_html, "render_demo_html", lambda results, markdown: "<html></html>")
    write_demo(out, {"rows": []}, model, card)
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md", "results.json",
                                                     "shortcut.card.json", "shortcut.safetensors"]


def test_demo_refuses_a_folder_of_other_files_before_any_work(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    started = time.perf_counter()
    assert_one_line_error(run("demo", "--quick", "-o", tmp_path), "--overwrite")
    assert time.perf_counter() - started < 5 and (tmp_path / "mine.txt").read_text() == "keep"


# ---- 4. a concurrent write leaves a consistent pair ----------------------------------------------------------------


def test_racing_commits_leave_a_model_with_its_own_card(tmp_path):
    from modelfix.app.outputs import OutputPlan, commit

    target = tmp_path / "out.safetensors"
    weights = {"w": torch.zeros(64, 64)}
    for race in range(30):
        barrier = threading.Barrier(2)

        def writer(who):
            card = json.dumps({"writer": who, "race": race})

            def write_model(tmp, tmp_side):
                save_file(weights, str(tmp), metadata={"modelfix.card": card})
                tmp_side.write_text(card)
                barrier.wait()  # both pairs are ready: commit at the same moment

            commit(OutputPlan(model=target, overwrite=True), write_model=write_model)

        threads = [threading.Thread(target=writer, args=(who,)) for who in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with safe_open(str(target), framework="pt") as handle:
            embedded = json.loads(handle.metadata()["modelfix.card"])
        assert embedded == json.loads(target.with_name("out.card.json").read_text()), race
        assert embedded["race"] == race
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.card.json", "out.safetensors"]


# ---- 5. sizes checked on the meta device, before any allocation -------------------------------------------------


def test_a_huge_card_or_input_size_is_refused_fast(env, tmp_path):
    def huge(card):
        card["arch_kwargs"]["hidden"] = 1_500_000

    started = time.perf_counter()
    assert_one_line_error(run("inspect", with_card(env, tmp_path / "huge.safetensors", huge)), "parameters")
    assert time.perf_counter() - started < 5
    torch.save(load_file(str(env["model"])), tmp_path / "plain.pt")
    assert_one_line_error(run("inspect", tmp_path / "plain.pt", "--arch", "mlp", "--num-classes", "10",
                              "--input-size", "100000x100000"), "--input-size")


# ---- 6. bounded inputs ---------------------------------------------------------------------------------------------


def test_a_decompression_bomb_is_refused_naming_the_file(env, tmp_path):
    data = tmp_path / "data"
    (data / "0").mkdir(parents=True)
    shutil.copy(next((env["folder"] / "images" / "0").iterdir()), data / "0" / "good.png")
    bomb_png(data / "0" / "bomb.png")
    assert_one_line_error(run("evaluate", env["model"], "--data", data), "bomb.png")
    tag = bomb_png(tmp_path / "tag.png")
    assert_one_line_error(run("evaluate", env["model"], "--data", env["folder"], "--artifact", f"image:{tag}"),
                          "tag.png")


def test_json_nested_100000_deep_is_refused(env, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    card = '{"arch": "mlp", "x": ' + deep + "}"
    save_file(load_file(str(env["model"])), str(tmp_path / "deep.safetensors"),
              metadata={"format": "pt", "modelfix.card": card})
    assert_one_line_error(run("inspect", tmp_path / "deep.safetensors"), "deep")
    for name in ("deep.json", "deep.yaml"):
        (tmp_path / name).write_text(deep)
        assert_one_line_error(run("prune-crayon", env["model"], "--feedback", tmp_path / name, "--data", env["folder"],
                                  "-o", tmp_path / "o.safetensors"), name)


# ---- 7. one line, exit 2 -------------------------------------------------------------------------------------------


def _bad_class_names(env, tmp):
    data = tmp / "data"
    shutil.copytree(env["folder"], data)
    meta = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**meta, "class_names": "0123456789"}))  # a string, not a list
    return data


BAD = [
    ("prune-egem --batch-size 0", lambda e, t: ["prune-egem", e["model"], "--clean-dir", e["folder"], "--batch-size",
                                                "0", "-o", t / "o.safetensors"], "--batch-size"),
    ("refit --batch-size 0", lambda e, t: ["refit", e["model"], "--clean-dir", e["folder"], "--batch-size", "0", "-o",
                                           t / "o.safetensors"], "batch"),
    ("feedback gallery --batch-size 0", lambda e, t: ["feedback", "gallery", e["model"], "--data", e["folder"],
                                                      "--batch-size", "0", "-o", t / "g"], "batch"),
    ("feedback saliency --batch-size 0", lambda e, t: ["feedback", "saliency", e["model"], "--data", e["folder"],
                                                       "--batch-size", "0", "-o", t / "s"], "batch"),
    ("feedback simulate --batch-size 0", lambda e, t: ["feedback", "simulate", e["model"], "--data", e["folder"],
                                                       "--batch-size", "0", "-o", t / "s.csv"], "batch"),
    ("--num-classes 0", lambda e, t: ["inspect", t / "plain.pt", "--arch", "mlp", "--num-classes", "0"], "--num-classes"),
    ("--std 0", lambda e, t: ["inspect", t / "plain.pt", "--arch", "mlp", "--num-classes", "10", "--std", "0"], "--std"),
    ("a folder as artifact image", lambda e, t: ["evaluate", e["model"], "--data", e["folder"], "--artifact",
                                                 f"image:{e['folder']}"], "is a folder"),
    ("unknown arch in a card", lambda e, t: ["inspect", with_card(e, t / "u.safetensors",
                                                                  lambda c: c.update(arch="nosucharch"))], "nosucharch"),
    ("a NaN bundle", lambda e, t: ["evaluate", e["model"], "--data", t / "nan.npz"], "NaN"),
    ("an empty bundle", lambda e, t: ["evaluate", e["model"], "--data", t / "empty.npz"], "empty"),
    ("bad dataset.json class names", lambda e, t: ["train", "--arch", "mlp", "--data", _bad_class_names(e, t),
                                                   "-o", t / "o.safetensors"], "class_names"),
    ("evaluate -o EXISTING_FILE", lambda e, t: ["evaluate", e["model"], "--data", e["folder"], "-o", t / "plain.pt"],
     "plain.pt"),
    ("a 240-character -o", lambda e, t: ["evaluate", e["model"], "--data", e["folder"], "-o", t / ("a" * 240)],
     "too long"),
]


@pytest.mark.parametrize("name,argv,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_exit_2(env, tmp_path, name, argv, fragment):
    torch.save(load_file(str(env["model"])), tmp_path / "plain.pt")
    np.savez(tmp_path / "nan.npz", x=np.full((4, 1, 28, 28), np.nan, np.float32), y=np.arange(4))
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 1, 28, 28), np.float32), y=np.zeros(0, np.int64))
    args = argv(env, tmp_path)
    before = digest(tmp_path)
    assert_one_line_error(run(*args), fragment)
    assert digest(tmp_path) == before


def test_a_non_zip_npz_never_suggests_allow_pickle_and_debug_keeps_exit_2(env, tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip archive at all")
    result = run("evaluate", env["model"], "--data", tmp_path / "x.npz")
    assert_one_line_error(result, "x.npz")
    assert "pickle" not in result.stderr
    debug = run("--debug", "evaluate", env["model"], "--data", tmp_path / "x.npz")
    assert debug.exit_code == 2 and "Traceback" in debug.stderr


# ---- 8. runs that used to end silently wrong ---------------------------------------------------------------------


def test_a_diverging_training_run_fails_naming_the_epoch(tmp_path):
    result = run("train", "--arch", "mlp", "--data", "decoy-digits:train", "--epochs", "3", "--lr", "1e9",
                 "-o", tmp_path / "o.safetensors")
    assert_one_line_error(result, "diverged at epoch 1", code=1)
    assert list(tmp_path.iterdir()) == []


def test_divergence_rule_leaves_an_ordinary_finetune_alone():
    from modelfix.errors import TrainingFailed
    from modelfix.training import check_divergence

    check_divergence(0.5, 0.001, 10, 2)  # a fine-tune that starts near 0 may rise
    with pytest.raises(TrainingFailed, match="epoch 4"):
        check_divergence(3.4e12, 2.3, 10, 4)


def test_an_artifact_target_outside_the_classes_is_refused(env):
    assert_one_line_error(run("evaluate", env["model"], "--data", env["folder"], "--artifact", "pixels:1:2,target=42"),
                          "target 42")


def test_min_relevance_outside_0_1_is_refused(env, tmp_path):
    assert_one_line_error(run("prune-egem", env["model"], "--clean-dir", env["folder"], "--min-relevance", "5",
                              "-o", tmp_path / "o.safetensors"), "--min-relevance")
    assert list(tmp_path.iterdir()) == []


def test_float_images_in_0_255_warn(env, tmp_path):
    x = torch.rand(20, 1, 28, 28) * 255
    np.savez(tmp_path / "f.npz", x=x.numpy(), y=np.arange(20) % 10)
    result = run("evaluate", env["model"], "--data", tmp_path / "f.npz", "--poison", "0")
    assert result.exit_code == 0, result.stderr
    assert "warning:" in result.stderr and "value range" in result.stderr
    quiet = run("evaluate", env["model"], "--data", env["folder"], "--poison", "0")
    assert "warning" not in quiet.stderr


# ---- one file mode for every output ------------------------------------------------------------------------------


def test_outputs_are_written_with_0666_minus_umask(env, tmp_path):
    old = os.umask(0o027)
    try:
        assert run("train", "--arch", "mlp", "--data", env["folder"], "--epochs", "1", "-o", tmp_path / "t.safetensors",
                   "--report", tmp_path / "rep").exit_code == 0
        assert run("data", "make", "decoy-digits", "--split", "val", "-o", tmp_path / "made").exit_code == 0
        assert run("annotate", env["model"], "--data", env["folder"], "--tau", "0.05", "-o",
                   tmp_path / "masks.npz").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "made").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "masks.npz").stat().st_mode & 0o777 == 0o640
    for folder in (tmp_path / "made", tmp_path / "rep"):
        assert folder.stat().st_mode & 0o777 == 0o750
        assert {f.stat().st_mode & 0o777 for f in folder.rglob("*") if f.is_file()} == {0o640}
    assert {f.stat().st_mode & 0o777 for f in tmp_path.glob("t.*")} == {0o640}
