"""Reliability (issue 12): no lost work, no silent wrong result, every bad option a clear one-line error.

One test (or a few) per numbered case of the issue, plus kill-and-resume of `zsad train` and `zsad eval` driven by
real subprocesses and signals. Everything runs on the tiny random-weight backbone at 56 px on a few images; the
subprocesses wait for a marker file (never for a time) and every wait is bounded.
"""
import csv
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from zsadlib import metrics as M
from zsadlib.cli import main
from zsadlib.data import DatasetWarning, open_dataset
from zsadlib.methods import build_method
from zsadlib.train import TrainConfig, train

SIZE = 56
TINY = ["--backbone", "tiny", "--pretrained", "none", "--image-size", str(SIZE), "--device", "cpu", "--quiet"]
WAIT_S = 120  # upper bound of any wait on a subprocess (a marker file ends it much sooner)


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("zsad: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def train_args(root, out, *extra):
    return ["train", "--method", "april_gan", "--dataset", "synthetic", "--data-root", str(root), "--classes",
            "carpet", "bottle", "--max-per-class", "2", "--batch-size", "2", "--max-steps", "3", "--out", str(out),
            *TINY, *extra]


def eval_args(root, out, *extra):
    return ["eval", "--method", "winclip", "--dataset", "synthetic", "--data-root", str(root), "--classes",
            "carpet", "--max-per-class", "4", "--batch-size", "2", "--out", str(out), *TINY, *extra]


def work_dirs(*folders):
    return [p for folder in folders for pattern in (".zsad-eval-*", "zsad-eval-*") for p in Path(folder).glob(pattern)]


# ---- subprocesses that stop at a known point (a marker file), for real signals -------------------------------
STOP_IN_EVAL = """
import pathlib, sys, time
import zsadlib.evaluate as E
from zsadlib.cli import main
real = E.run_method
def stop_after_first_batch(*args, **kwargs):
    out = real(*args, **kwargs)
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(600)
    return out
E.run_method = stop_after_first_batch
sys.exit(main(sys.argv[2:]))
"""

STOP_IN_TRAIN = """
import pathlib, sys, time
import zsadlib.train as T
from zsadlib.cli import main
real = T.save_learned
def stop_after_checkpoint_two(method, path, metadata=None):
    out = real(method, path, metadata)
    if (metadata or {}).get("step") == 2 and not metadata.get("final"):
        pathlib.Path(sys.argv[1]).touch()
        time.sleep(600)
    return out
T.save_learned = stop_after_checkpoint_two
sys.exit(main(sys.argv[2:]))
"""


def start_and_wait(script, marker, argv, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path / "systemp"), TQDM_DISABLE="1")
    (tmp_path / "systemp").mkdir(exist_ok=True)
    process = subprocess.Popen([sys.executable, "-c", script, str(marker), *argv], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + WAIT_S
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate(timeout=WAIT_S)
            pytest.fail(f"the subprocess never reached the marker (rc {process.returncode}): {err[-2000:]}")
        time.sleep(0.05)
    return process


# ---- 1. predict: unique output names ------------------------------------------------------------------------
def test_predict_output_names_are_unique_whatever_the_collisions(capsys, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a.png": (30, 40), "a.jpg": (50, 20), "a_2.png": (60, 70)}  # a.jpg would take "a_2" from a_2.png
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    out = tmp_path / "pred"
    code, _, err = run(capsys, "predict", "--method", "winclip", str(folder), "--out", str(out), "--npy", *TINY)
    assert code == 0, err
    with open(out / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    stems = [row["output_stem"] for row in rows]
    assert len(rows) == 3 and len(set(stems)) == 3, stems
    for row in rows:  # each input's own files, at its own size (none overwritten by another input's)
        h, w = sizes[Path(row["path"]).name]
        assert Image.open(out / f"{row['output_stem']}_map.png").size == (w, h)
        assert Image.open(out / f"{row['output_stem']}_overlay.png").size == (w, h)
        assert np.load(out / f"{row['output_stem']}_map.npy").shape == (h, w)
    assert len(list(out.glob("*_map.png"))) == 3
    # stable: the same inputs get the same names
    code, _, err = run(capsys, "predict", "--method", "winclip", str(folder), "--out", str(tmp_path / "again"), *TINY)
    with open(tmp_path / "again" / "scores.csv") as handle:
        assert [row["output_stem"] for row in csv.DictReader(handle)] == stems


# ---- 2. eval --out checked before any work ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["existing file", "below a file"])
def test_eval_out_is_checked_before_any_work(capsys, tmp_path, synthetic_root, monkeypatch, kind):
    import zsadlib.evaluate

    def no_work(*args, **kwargs):
        raise AssertionError("evaluate ran although --out cannot take the results")

    monkeypatch.setattr(zsadlib.evaluate, "evaluate", no_work)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker if kind == "existing file" else blocker / "results"
    code, _, err = run(capsys, *eval_args(synthetic_root, out))
    one_line_error(code, err, "--out", str(out))


def test_eval_writes_results_atomically_and_leaves_no_temporary_files(capsys, tmp_path, synthetic_root,
                                                                        monkeypatch):
    out = tmp_path / "eval"
    assert run(capsys, *eval_args(synthetic_root, out))[0] == 0
    before = (out / "scores.csv").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "per_class.png", "scores.csv"]
    # a failure half-way through writing the new scores.csv leaves the previous one whole
    import zsadlib.evaluate

    class FullDisk(zsadlib.evaluate.csv.DictWriter):
        def writerows(self, rows):
            self.writerow(rows[0])
            raise OSError("disk full")

    monkeypatch.setattr(zsadlib.evaluate.csv, "DictWriter", FullDisk)
    code, _, err = run(capsys, *eval_args(synthetic_root, out))
    assert code == 2 and "disk full" in err
    assert (out / "scores.csv").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "per_class.png", "scores.csv"]


# ---- 3. killed evaluations leave no work files in the system temp folder ---------------------------------------
def test_sigterm_during_eval_removes_its_work_files(tmp_path, synthetic_root):
    out = tmp_path / "eval"
    process = start_and_wait(STOP_IN_EVAL, tmp_path / "marker", eval_args(synthetic_root, out), tmp_path)
    assert work_dirs(out), "the disk-backed maps live under --out while the evaluation runs"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=WAIT_S)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err
    assert work_dirs(out, tmp_path / "systemp") == []


def test_sigkill_during_eval_then_the_next_run_cleans_up_and_finishes(capsys, tmp_path, synthetic_root):
    out = tmp_path / "eval"
    process = start_and_wait(STOP_IN_EVAL, tmp_path / "marker", eval_args(synthetic_root, out), tmp_path)
    process.kill()
    process.communicate(timeout=WAIT_S)
    assert work_dirs(tmp_path / "systemp") == []  # nothing in the system temp folder
    left = work_dirs(out)
    assert len(left) == 1 and str(process.pid) in left[0].name  # under --out, named by the dead process
    code, _, err = run(capsys, *eval_args(synthetic_root, out))  # the rerun: stale work files go, results come
    assert code == 0, err
    assert work_dirs(out) == [] and (out / "metrics.json").is_file()


# ---- train: kill -9 and resume gives the uninterrupted result ----------------------------------------------------
def test_sigkill_during_train_then_resume_equals_an_uninterrupted_run(capsys, tmp_path, synthetic_root):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run(capsys, *train_args(synthetic_root, whole))[0] == 0
    process = start_and_wait(STOP_IN_TRAIN, tmp_path / "marker", train_args(synthetic_root, killed), tmp_path)
    process.kill()
    process.communicate(timeout=WAIT_S)
    assert not (killed / "learned.safetensors").exists()
    code, out, err = run(capsys, *train_args(synthetic_root, killed))
    assert code == 0, err
    a, b = load_file(str(whole / "learned.safetensors")), load_file(str(killed / "learned.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]


# ---- 4. resume with a changed option --------------------------------------------------------------------------
def test_resume_with_a_changed_option_is_refused_naming_it(capsys, tmp_path, synthetic_root):
    run_dir = tmp_path / "run"
    assert run(capsys, *train_args(synthetic_root, run_dir, "--max-steps", "1"))[0] == 0
    code, _, err = run(capsys, *train_args(synthetic_root, run_dir, "--lr", "0.5"))
    line = one_line_error(code, err, "--lr", "0.5", "--restart")
    saved = json.loads((run_dir / "checkpoints" / "last.json").read_text())["train_config"]["lr"]
    assert str(saved) in line and "resume=False" not in line
    # the record still says what was used
    assert json.loads((run_dir / "learned.json").read_text())["train_config"]["lr"] == saved
    # --restart starts over with the new value
    code, _, err = run(capsys, *train_args(synthetic_root, run_dir, "--lr", "0.5", "--max-steps", "1", "--restart"))
    assert code == 0, err
    assert json.loads((run_dir / "learned.json").read_text())["train_config"]["lr"] == 0.5


# ---- 5. a crash between the optimiser state and the `last` checkpoint --------------------------------------------
@pytest.fixture(scope="module")
def small_train_set(synthetic_root):
    return open_dataset("synthetic", synthetic_root, classes=["carpet", "bottle"], image_size=SIZE).subset(
        max_per_class=2)


def fresh_method():
    return build_method("april_gan", backbone="tiny", pretrained=None, image_size=SIZE, device="cpu")


def quick(**changes):
    from zsadlib.methods import get_method_class

    return TrainConfig.from_method(get_method_class("april_gan").config_class(),
                                   **{"batch_size": 2, "epochs": 2, "seed": 3, "checkpoint_every": 1, **changes})


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, small_train_set):
    """An uninterrupted run of quick() (4 steps), to compare interrupted ones with."""
    out = tmp_path_factory.mktemp("whole")
    result = train(fresh_method(), small_train_set, out, quick(), progress=False)
    return out, result


class Crash(Exception):
    pass


def test_crash_between_optimizer_state_and_last_checkpoint_resumes_from_the_newest_complete_one(
        tmp_path, small_train_set, whole_run, monkeypatch):
    import zsadlib.train as T

    whole_dir, whole = whole_run
    real = T.save_learned

    def crash_at_three(method, path, metadata=None):
        if (metadata or {}).get("step") == 3:  # optimizer.pt is at step 3 already, last.* still at step 2
            raise Crash
        return real(method, path, metadata)

    monkeypatch.setattr(T, "save_learned", crash_at_three)
    with pytest.raises(Crash):
        train(fresh_method(), small_train_set, tmp_path / "run", quick(), progress=False)
    monkeypatch.setattr(T, "save_learned", real)
    with pytest.warns(T.TrainingWarning, match="interrupted: resuming from step 2"):
        resumed = train(fresh_method(), small_train_set, tmp_path / "run", quick(), progress=False)
    assert resumed.finished and resumed.resumed_from_step == 2 and resumed.step == whole.step == 4
    a = load_file(str(whole_dir / "learned.safetensors"))
    b = load_file(str(tmp_path / "run" / "learned.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_crash_in_the_middle_of_the_last_checkpoint_write_resumes_too(tmp_path, small_train_set, whole_run,
                                                                      monkeypatch):
    """.safetensors of step 3 written, its .json not: the header's step tells them apart."""
    import zsadlib.checkpoint as C
    import zsadlib.train as T

    real_json = C._write_json

    def crash_on_json_of_three(path, payload):
        if payload.get("step") == 3:
            raise Crash
        return real_json(path, payload)

    monkeypatch.setattr(C, "_write_json", crash_on_json_of_three)
    with pytest.raises(Crash):
        train(fresh_method(), small_train_set, tmp_path, quick(), progress=False)
    monkeypatch.setattr(C, "_write_json", real_json)
    with pytest.warns(T.TrainingWarning, match="resuming from step 2"):
        resumed = train(fresh_method(), small_train_set, tmp_path, quick(), progress=False)
    assert resumed.finished and resumed.resumed_from_step == 2
    a, b = load_file(str(whole_run[0] / "learned.safetensors")), load_file(str(tmp_path / "learned.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- 6. eval of an unfinished run -------------------------------------------------------------------------------
def test_eval_of_an_unfinished_run_says_so_and_records_the_step(capsys, tmp_path, small_train_set, synthetic_root):
    run_dir = tmp_path / "run"
    stopped = train(fresh_method(), small_train_set, run_dir, quick(), progress=False, stop_after_steps=1)
    assert not stopped.finished and not (run_dir / "learned.safetensors").exists()
    args = ["eval", "--method", "april_gan", "--checkpoint", str(run_dir), "--dataset", "synthetic",
            "--data-root", str(synthetic_root), "--classes", "pill", "--max-per-class", "2",
            "--out", str(tmp_path / "eval"), *TINY]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert "unfinished run" in out and "step 1 of 4" in out
    extra = json.loads((tmp_path / "eval" / "metrics.json").read_text())["extra"]
    assert (extra["checkpoint_step"], extra["checkpoint_total_steps"], extra["checkpoint_finished"]) == (1, 4, False)


# ---- 7. folder dataset: images in nested subfolders ---------------------------------------------------------
def test_folder_dataset_warns_about_images_in_subfolders_with_the_count(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("good/a.png", "good/sub/b.png", "good/sub/deeper/c.png", "bad/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / name)
    with pytest.warns(DatasetWarning, match=r"2 images in subfolders of good/ or bad/ are not used"):
        dataset = open_dataset("folder", tmp_path, image_size=SIZE)
    assert len(dataset) == 2


# ---- 8. metrics: length mismatches and empty input ----------------------------------------------------------
def test_compute_table_refuses_class_names_of_another_length():
    with pytest.raises(ValueError, match=r"class_names has 3 items but labels has 4"):
        M.compute_table([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], None, None, ["a", "a", "a"])
    maps = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    masks = maps > 0.9
    with pytest.raises(ValueError, match=r"has 3 items but masks has 4"):  # labels shorter than the maps
        M.compute_table([0, 1, 0], [0.1, 0.9, 0.2], masks, maps, ["a", "a", "a"])


def test_compute_refuses_labels_shorter_than_the_maps():
    maps = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"labels has 3 items but masks has 4"):
        M.compute([0, 1, 0], [0.1, 0.9, 0.2], maps > 0.9, maps)


def test_compute_of_no_images_says_so():
    with pytest.raises(ValueError, match="no images"):
        M.compute([], [], None, None)


# ---- 9-13. bad options: one line, exit code 2 ---------------------------------------------------------------
def _eval(root, *extra):
    args = ["eval", "--method", "winclip", "--dataset", "synthetic", "--data-root", str(root), "--classes", "carpet"]
    return [*args, "--backbone", "tiny", "--pretrained", "none", "--device", "cpu", "--quiet", *extra]


@pytest.mark.parametrize("size, needle", [("0", "at least 14"), ("-3", "at least 14"), ("99988", "GiB")])
def test_image_size_out_of_bounds(capsys, synthetic_root, size, needle):
    code, _, err = run(capsys, *_eval(synthetic_root, "--image-size", size))
    one_line_error(code, err, "--image-size", needle)


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "foo"])
def test_unavailable_device_names_what_is_available(capsys, synthetic_root, device):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, *_eval(synthetic_root, "--image-size", str(SIZE), "--device", device))
    one_line_error(code, err, f"--device {device}", "available: auto, cpu")


@pytest.mark.parametrize("command, flag", [("eval", "--max-per-class"), ("eval", "--batch-size"),
                                           ("predict", "--batch-size"), ("train", "--max-per-class")])
def test_zero_counts_are_refused(capsys, tmp_path, synthetic_root, command, flag):
    if command == "eval":
        argv = _eval(synthetic_root, "--image-size", str(SIZE), flag, "0")
    elif command == "train":
        argv = [*train_args(synthetic_root, tmp_path / "run"), flag, "0"]
    else:
        Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
        argv = ["predict", "--method", "winclip", str(tmp_path / "x.png"), "--out", str(tmp_path / "p"), *TINY,
                flag, "0"]
    code, _, err = run(capsys, *argv)
    one_line_error(code, err, f"{flag} must be at least 1")


def test_pretrained_that_is_not_a_weights_file(capsys, tmp_path, synthetic_root):
    bogus = tmp_path / "notes.bin"
    bogus.write_text("these are not weights\n" * 10)
    code, _, err = run(capsys, *_eval(synthetic_root, "--image-size", str(SIZE), "--pretrained", str(bogus)))
    line = one_line_error(code, err, str(bogus), "not a weights file")
    assert "weights_only" not in line


def test_tiny_backbone_with_a_weights_tag_is_refused_and_the_record_is_consistent(capsys, synthetic_root):
    code, _, err = run(capsys, *_eval(synthetic_root, "--image-size", str(SIZE), "--pretrained", "openai"))
    one_line_error(code, err, "tiny", "openai", "--pretrained none")
    # the Python API keeps the tag-less default working, and records what was used in every field
    method = build_method("winclip", backbone="tiny", pretrained="openai", image_size=SIZE, device="cpu")
    described = method.describe()
    assert method.config.pretrained is None and described["config"]["pretrained"] is None
    assert described["backbone"]["pretrained"] is None


# ---- 14. file modes ------------------------------------------------------------------------------------------------
def test_run_folder_files_all_have_the_usual_mode(whole_run):
    umask = os.umask(0o022)
    os.umask(umask)
    run_dir = whole_run[0]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    modes = {p.relative_to(run_dir).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
    assert "checkpoints/last.prev.safetensors" in modes  # the rotated files too


# ---- structure: methods never import the engines that drive them -------------------------------------------------
def _imported_modules(path: Path) -> set[str]:
    """Modules a file imports at run time (``if TYPE_CHECKING:`` blocks left out), relative ones with their dots."""
    import ast

    names: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return names


def test_methods_checkpoint_and_runtime_do_not_import_the_engines():
    import zsadlib

    package = Path(zsadlib.__file__).parent
    low = [*sorted((package / "methods").glob("*.py")), package / "checkpoint.py", package / "runtime.py",
           package / "errors.py"]
    for path in low:
        imported = _imported_modules(path)
        engines = {name for name in imported
                   if name.split(".")[-1] in ("train", "evaluate", "predict", "cli", "demo")}
        assert not engines, f"{path.name} imports {sorted(engines)}"
    for path in (package / "checkpoint.py", package / "runtime.py", package / "errors.py"):
        assert not any("methods" in name for name in _imported_modules(path)), path


def test_names_stay_importable_from_where_they_were():
    from zsadlib import checkpoint, runtime
    from zsadlib.evaluate import PRECISIONS, autocast
    from zsadlib.methods import MethodError
    from zsadlib.train import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_learned
    from zsadlib.utils import resolve_device

    assert autocast is runtime.autocast and PRECISIONS is runtime.PRECISIONS
    assert resolve_device is runtime.resolve_device
    assert load_checkpoint is checkpoint.load_checkpoint and save_learned is checkpoint.save_learned
    assert CheckpointError is checkpoint.CheckpointError and issubclass(CheckpointError, MethodError)
    assert CHECKPOINT_FORMAT == checkpoint.CHECKPOINT_FORMAT
    assert list(checkpoint.TRAIN_CONFIG_FIELDS) == TrainConfig.fields()
