"""WinCLIP fixtures: anomalib's ``WinClipModel`` (anomalib 2.7.0, zero-shot and WinCLIP+ few-shot) on the seeded
tiny-ref CLIP.

    python -m tools.reference_fixtures winclip --ref /tmp/anomalib-venv     # a venv (or its python) with anomalib

anomalib needs open_clip_torch < 2.26.1 (the range its ``clip`` extra pins): from 2.26.1 open_clip's transformer
is batch-first, while anomalib's window path permutes its windows to sequence-first (``NLD -> LND``) before calling
it, so attention mixes different windows and the window scores (hence the maps) come out nearly flat. Such a version
cannot live beside this project's open_clip, so the reference runs in a side environment::

    python3 -m venv /tmp/anomalib-venv
    /tmp/anomalib-venv/bin/pip install anomalib==2.7.0 "open_clip_torch<2.26.1"    # picks open_clip 2.24.0

This process (the project's venv) builds zsadlib's tiny-ref backbone at 240 px (bilinear positional-embedding
resize, as the tests load it), saves its state dict, the images and the settings to a temporary folder, and runs
this same file with the side environment's python (``_run_reference``, which imports only torch, open_clip and
anomalib). There open_clip 2.24 builds tiny-ref at 240 px, loads that state dict strictly, and
``open_clip.create_model_and_transforms`` is replaced by a function returning it, so anomalib's own constructor,
``setup`` (text prompt ensemble, reference memory) and ``forward`` run unchanged. Nothing of anomalib is copied.

Variants written to tests/fixtures/winclip_reference.npz (prefix per variant), class name "bottle", scales (2, 3),
three test images (two seeded normal images, and the first reference image with light noise and a 64 x 64 square
of noise pasted):

* ``zero/``: k_shot 0: ``scores`` [3], ``maps`` [3, 240, 240], ``grid`` [3, 15, 15] (``_compute_zero_shot_scores``),
  ``text`` [2, D];
* ``k1/``, ``k2/``: ``setup(reference_images=shots[:k])``: ``scores``, ``maps``, ``few_grid``
  (``_compute_few_shot_scores``), ``patch_grid`` (the patch-token association map).
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPOSITORY = "open-edge-platform/anomalib"
VERSION = "2.7.0"
CLASS_NAME = "bottle"
SCALES = (2, 3)
K_SHOTS = (1, 2)
SHOT_SEED = 7  # seeds the reference (normal) images, apart from the test images
FILES = ("torch_model.py", "utils.py", "prompting.py")  # anomalib/models/image/winclip, hashed into the record


def shot_images() -> torch.Tensor:
    """[2, 3, 240, 240] seeded images used as the normal references."""
    from .common import reference_images

    return reference_images(batch=max(K_SHOTS), seed=SHOT_SEED)


def query_images() -> torch.Tensor:
    """[3, 3, 240, 240]: the two standard reference-test images, and the first shot image plus light noise (std
    0.1) with a 64 x 64 square of fresh noise at rows/cols 96..159: its few-shot map is low outside the square. The
    light noise keeps every window distance well above rounding: a window identical to a memory item has distance
    0 +- 1e-7, and anomalib's harmonic mean of such values (negative ones included) is rounding noise."""
    from .common import reference_images

    generator = torch.Generator().manual_seed(SHOT_SEED + 1)
    pasted = shot_images()[0] + 0.1 * torch.randn(3, 240, 240, generator=generator)
    pasted[:, 96:160, 96:160] = torch.randn(3, 64, 64, generator=generator)
    return torch.cat([reference_images(), pasted[None]])


def _side_python(ref: str) -> Path:
    path = Path(ref).expanduser()
    python = path / "bin" / "python" if path.is_dir() else path
    if not python.is_file():
        raise SystemExit(f"--ref {ref}: give the side venv (with anomalib {VERSION}) or its python")
    return python


def main(ref: str) -> None:
    from .common import REPO_ROOT, write
    from tests.reference import reference_backbone

    python = _side_python(ref)
    backbone = reference_backbone()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        torch.save({"state_dict": {k: v.clone() for k, v in backbone.model.state_dict().items()},
                    "model_config": str(REPO_ROOT / "zsadlib" / "model_configs" / "tiny-ref.json"),
                    "image_size": backbone.image_size, "images": query_images(), "shots": shot_images(),
                    "class_name": CLASS_NAME, "scales": SCALES, "k_shots": K_SHOTS}, folder / "inputs.pt")
        subprocess.run([str(python), str(Path(__file__).resolve()), str(folder)], check=True)
        result = torch.load(folder / "outputs.pt")
    info = result.pop("__info__")
    if info["anomalib"] != VERSION:
        print(f"warning: the side environment has anomalib {info['anomalib']}, the fixtures document {VERSION}",
              file=sys.stderr)
    write("winclip_reference", result, Path(info["path"]), REPOSITORY, "",
          {"anomalib": info["anomalib"], "open_clip": info["open_clip"], "reference_torch": info["torch"],
           "winclip_sha256": info["sha256"], "class_name": CLASS_NAME, "scales": list(SCALES),
           "k_shots": list(K_SHOTS), "shot_seed": SHOT_SEED, "images": "tests.reference.reference_images() + the "
           "first shot image with noise std 0.1 and a 64 x 64 noise square", "pos_embed_resize": "bilinear (zsadlib, 224 -> 240)"})


# ---------------------------------------------------------------------------------------------------------
# the side environment (run as a script by main): torch, open_clip < 2.26.1, anomalib only
# ---------------------------------------------------------------------------------------------------------
def _run_reference(folder: Path) -> None:
    from importlib.metadata import version

    import anomalib
    import open_clip
    from anomalib.models.image.winclip import torch_model
    from anomalib.models.image.winclip.utils import class_scores, visual_association_score

    torch.set_num_threads(2)
    inputs = torch.load(folder / "inputs.pt")
    open_clip.add_model_config(inputs["model_config"])
    clip = open_clip.create_model("tiny-ref", pretrained=None, force_image_size=inputs["image_size"])
    clip.load_state_dict(inputs["state_dict"], strict=True)
    clip.eval()
    torch_model.open_clip.create_model_and_transforms = lambda *args, **kwargs: (clip, None, None)

    images, shots = inputs["images"], inputs["shots"]
    model = torch_model.WinClipModel(class_name=inputs["class_name"], scales=tuple(inputs["scales"])).eval()
    out = {}
    with torch.no_grad():
        prediction = model(images)
        image_embeddings, windows, patches = model.encode_image(images)
        image_scores = class_scores(image_embeddings, model.text_embeddings, model.temperature, target_class=1)
        grid = model._compute_zero_shot_scores(image_scores, windows)  # noqa: SLF001
        if float(grid.amax() - grid.amin()) < 1e-3:
            raise SystemExit(f"anomalib's zero-shot maps are flat: open_clip {version('open_clip_torch')} is too new "
                             "(install open_clip_torch<2.26.1 in the side environment)")
        out.update({"zero/scores": prediction.pred_score, "zero/maps": prediction.anomaly_map, "zero/grid": grid,
                    "zero/text": model.text_embeddings})
        for k in inputs["k_shots"]:
            model.setup(reference_images=shots[:k])
            assert model.k_shot == k
            prediction = model(images)
            few = model._compute_few_shot_scores(patches, windows)  # noqa: SLF001
            patch_grid = visual_association_score(patches, model.patch_embeddings).reshape(-1, *model.grid_size)
            out.update({f"k{k}/scores": prediction.pred_score, f"k{k}/maps": prediction.anomaly_map,
                        f"k{k}/few_grid": few, f"k{k}/patch_grid": patch_grid})
    source = Path(torch_model.__file__).parent
    out["__info__"] = {"anomalib": anomalib.__version__, "open_clip": version("open_clip_torch"),
                       "torch": str(torch.__version__), "path": str(source),
                       "sha256": {name: hashlib.sha256((source / name).read_bytes()).hexdigest()[:16]
                                  for name in FILES}}
    torch.save(out, folder / "outputs.pt")


if __name__ == "__main__":
    _run_reference(Path(sys.argv[1]))
