"""The `zsad` command: happy paths on the synthetic data and a folder of user images; one-line error paths."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zsadlib.cli import main

TINY = ["--backbone", "tiny", "--pretrained", "none", "--image-size", "112", "--device", "cpu", "--quiet"]


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_methods_lists_winclip(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0 and "winclip" in out and "ViT-B-16-plus-240" in out


def test_console_script_is_installed():
    zsad = Path(sys.executable).parent / "zsad"
    result = subprocess.run([str(zsad), "methods"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "winclip" in result.stdout


def test_data_synth(capsys, tmp_path):
    code, out, _ = run(capsys, "data", "synth", "--out", str(tmp_path / "syn"), "--size", "64", "--quiet")
    assert code == 0 and "written" in out
    assert (tmp_path / "syn" / "meta.json").is_file()
    assert list((tmp_path / "syn" / "bottle" / "ground_truth").glob("*/*_mask.png"))


def test_eval_on_synthetic(capsys, tmp_path, synthetic_root):
    out_dir = tmp_path / "eval"
    code, out, err = run(capsys, "eval", "--method", "winclip", "--dataset", "synthetic", "--data-root",
                         str(synthetic_root), "--classes", "carpet", "pill", "--max-per-class", "4",
                         "--out", str(out_dir), *TINY)
    assert code == 0, err
    assert "carpet" in out and "mean" in out and "mean nothing" in out
    summary = json.loads((out_dir / "metrics.json").read_text())
    assert sorted(summary["per_class"]) == ["carpet", "pill"]
    assert summary["extra"]["argv"][0] == "eval"
    assert (out_dir / "scores.csv").is_file() and (out_dir / "per_class.png").is_file()


def _user_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Images of odd sizes and modes, as users have them: name -> (H, W)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (37, 61, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (80, 40, 4), dtype=np.uint8), mode="RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (50, 50), dtype=np.uint16)).save(folder / "deep.png")
    Image.fromarray(rng.integers(0, 255, (30, 90), dtype=np.uint8), mode="L").convert("P").save(folder / "pal.bmp")
    return {"rgb": (37, 61), "rgba": (80, 40), "deep": (50, 50), "pal": (30, 90)}


def test_predict_on_a_folder_of_user_images(capsys, tmp_path):
    sizes = _user_images(tmp_path / "mine")
    out_dir = tmp_path / "pred"
    code, out, err = run(capsys, "predict", "--method", "winclip", "--class-name", "bottle",
                         str(tmp_path / "mine"), "--out", str(out_dir), "--npy", *TINY)
    assert code == 0, err
    for stem, (h, w) in sizes.items():
        heat = Image.open(out_dir / f"{stem}_map.png")
        assert heat.size == (w, h) and heat.mode == "L"
        assert Image.open(out_dir / f"{stem}_overlay.png").size == (w, h)
        assert np.load(out_dir / f"{stem}_map.npy").shape == (h, w)
    lines = (out_dir / "scores.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + len(sizes)


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--method", "nope", "--dataset", "mvtec", "--data-root", "x"], "unknown method 'nope'"),
    (["eval", "--method", "winclip", "--dataset", "mvtec", "--data-root", "/no/such/dir", *TINY], "/no/such/dir"),
    (["eval", "--method", "winclip", "--dataset", "imagenet", "--data-root", ".", *TINY], "unknown dataset kind"),
    (["predict", "--method", "winclip", "/no/such/image.png", "--out", "x", *TINY], "/no/such/image.png"),
    (["predict", "--method", "winclip", "--checkpoint", "c.safetensors", "a.png", "--out", "x", *TINY],
     "no learned parameters"),
    (["eval", "--method", "winclip", "--dataset", "synthetic", "--data-root", ".", "--backbone", "tiny",
      "--pretrained", "/no/weights.bin"], "/no/weights.bin does not exist"),
])
def test_errors_are_one_line_with_nonzero_exit(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zsad: error:") and needle in lines[0]
    assert "Traceback" not in err


def test_missing_default_weights_offline_is_one_line(capsys, tmp_path, synthetic_root):
    code, _, err = run(capsys, "eval", "--method", "winclip", "--dataset", "synthetic", "--data-root",
                       str(synthetic_root), "--device", "cpu")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "ViT-B-16-plus-240" in err and "laion400m_e31" in err and "pretrained=" in err


def test_corrupt_user_image_names_the_file(capsys, tmp_path):
    bad = tmp_path / "broken.png"
    good = tmp_path / "fine.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    bad.write_bytes(good.read_bytes()[:400])
    code, _, err = run(capsys, "predict", "--method", "winclip", str(good), str(bad), "--out",
                       str(tmp_path / "o"), *TINY)
    assert code == 2 and "broken.png" in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        main(["eval", "--method", "winclip", "--dataset", "synthetic", "--data-root", ".", "--backbone", "tiny",
              "--pretrained", str(tmp_path / "none.bin"), "--debug"])


def test_demo_with_tiny_backbone(capsys, tmp_path, synthetic_root):
    code, out, err = run(capsys, "demo", "--tiny", "--out", str(tmp_path / "demo"), "--data-root",
                         str(synthetic_root), "--max-per-class", "2", "--device", "cpu", "--quiet")
    assert code == 0, err
    from zsadlib.viz import RANDOM_WEIGHTS_LABEL

    assert RANDOM_WEIGHTS_LABEL in out  # the one wording of the random-weights label
    for name in ("metrics.json", "scores.csv", "per_class.png", "heatmaps.png"):
        assert (tmp_path / "demo" / name).is_file()
    summary = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert summary["random_weights"] and summary["extra"]["demo"]["tiny_fallback"]


@pytest.mark.parametrize("method", ["anomalyclip", "april_gan", "genclip"])
def test_train_then_eval_and_predict_with_the_checkpoint(capsys, tmp_path, synthetic_root, method):
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--method", method, "--dataset", "synthetic", "--data-root",
                         str(synthetic_root), "--classes", "carpet", "bottle", "--max-per-class", "4",
                         "--epochs", "1", "--batch-size", "4", "--out", str(run_dir), *TINY)
    assert code == 0, err
    assert (run_dir / "learned.safetensors").is_file() and (run_dir / "log.jsonl").is_file()
    assert f"--checkpoint {run_dir}" in out
    code, out, err = run(capsys, "eval", "--method", method, "--checkpoint", str(run_dir), "--dataset", "synthetic",
                         "--data-root", str(synthetic_root), "--classes", "pill", "--max-per-class", "2",
                         "--out", str(tmp_path / "eval"), *TINY)
    assert code == 0, err
    summary = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert summary["extra"]["checkpoint"] == str(run_dir)
    sizes = _user_images(tmp_path / "mine")
    code, _, err = run(capsys, "predict", "--method", method, "--checkpoint", str(run_dir), str(tmp_path / "mine"),
                       "--out", str(tmp_path / "pred"), *TINY)
    assert code == 0, err
    assert len(list((tmp_path / "pred").glob("*_overlay.png"))) == len(sizes)


def test_checkpoint_of_another_method_is_one_line(capsys, tmp_path, synthetic_root):
    run_dir = tmp_path / "run"
    assert run(capsys, "train", "--method", "anomalyclip", "--dataset", "synthetic", "--data-root",
               str(synthetic_root), "--classes", "carpet", "--max-per-class", "2", "--max-steps", "1",
               "--batch-size", "2", "--out", str(run_dir), *TINY)[0] == 0
    code, _, err = run(capsys, "eval", "--method", "genclip", "--checkpoint", str(run_dir), "--dataset", "synthetic",
                       "--data-root", str(synthetic_root), *TINY)
    assert code == 2 and "anomalyclip" in err and len(err.strip().splitlines()) == 1


def test_training_a_training_free_method_is_refused(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--method", "winclip", "--dataset", "synthetic", "--data-root", ".",
                       "--out", str(tmp_path), *TINY)
    assert code == 2 and "training-free" in err
