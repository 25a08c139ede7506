"""ViP2-CLIP fixtures from the authors' code: ``python -m tools.reference_fixtures vip2clip --ref PATH``.

PATH is a checkout of https://github.com/kim0806/ViP2-CLIP (fixtures written at 4b5884f, master; the side branch
patch_selecter_v1 is not used). Nothing of it is copied here: its modules are imported from PATH and its own
``train.train(args)`` and ``test.test(args)`` run end to end on the ``tiny-ref`` CLIP (tests/reference.py) at 240 px,
with the released settings (features 6/12/18/24, n_ctx 7, n_cls 3, top-k 50, sigma 8, seed 111). The stand-ins, all
undone when ``main`` returns (except the stub modules, which only exist in this process):

* ``VIP2CLIP_lib.load("ViT-L/14@336px", ...)`` -> the same ``load`` on a temporary file holding
  :func:`reference_state_dict`; while it runs ``torch.jit.load`` raises at once, so ``load`` falls back to reading
  the file as a state dict and its ``build_model`` / ``.float()`` path runs unchanged;
* widths the reference hard-codes for ViT-L (768 = joint width = text width): right after ``ICA.__init__`` its
  MetaNet (``Linearlayer(768, 768)``, hidden 384) is rebuilt by the same ``Linearlayer`` class with tiny-ref's widths
  (joint width in, text width out; both 128) and hidden width 32 (keeps the stored weights small; zsadlib's tests use
  ``meta_hidden=32``); ``FGP(dim_v=768, dim_t=768, dim_out=768)`` in train.py / test.py -> ``FGP`` at the joint width;
* ``Dataset`` of train.py / test.py -> an in-memory dataset of :func:`reference_images` (already tensors at 240 px)
  with a fixed mask and labels (1, 0);
* ``torch.Tensor.cuda`` -> identity while train.py runs (it calls ``label.long().cuda()`` unconditionally);
* stub modules for imports these code paths never use: ``cv2`` (visualization.py), ``tabulate`` (the final table)
  and ``pkg_resources`` (only ``pkg_resources.packaging``; the stub hands out the real ``packaging``);
* recorders (call the original, keep a copy): ``ICA`` (its state right after construction, the global features it
  receives), ``FGP`` (per call the text and patch inputs and the output), test.py's ``image_level_metrics`` (its
  ``results``: image scores and blurred maps; returns 0), train.py's ``FocalLoss`` / ``BinaryDiceLoss`` /
  ``F.cross_entropy`` (loss terms of the first step).

Two fixtures:

``vip2clip_init.npz``: ICA and FGP exactly as their constructors initialise them (torch seed 2024), saved as a
    ``{"prompt_learner", "Zero_try"}`` checkpoint that test.py loads; ``ckpt/prompt_learner/*`` and
    ``ckpt/Zero_try/*`` hold every key of it, buffers included (the real checkpoint format). FGP's default init makes
    its attention nearly uniform, so every map is ~0.5 here: this fixture checks the wiring and the format.
``vip2clip_trained.npz``: train.py, with its ICA / FGP loaded from that init checkpoint right after construction and
    FGP's query/key weights and biases then multiplied by 30 (attention far from uniform, so a wiring error cannot
    hide under the tolerance), for 5 epochs of one batch (the 2 images, batch size 2, lr 1e-3 / 1e-5; train.py saves
    from epoch 5 on); the loss terms of its first step (``loss_focal`` [4], ``loss_dice`` [8], ``loss_image_ce``), the
    mask and labels, the learned state it saved (``final/*``), and test.py on that ``epoch_5.pth``.

Per test.py run: ``scores`` [2], ``maps`` [2, 240, 240] (after the Gaussian, sigma 8), ``global_features`` [2, D]
(normalised, ICA input), ``text_features`` [2, 2, D] (ICA text, normalised), ``layer_text_features``
[2, 4, 2, D] (FGP outputs per layer), ``topk_indices`` [2, 4, 50] (sorted; computed here from the recorded FGP
inputs/outputs with test.py's formula: top-k of softmax(cos / 0.07)[anomalous]).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from .common import (REF_IMAGE_SIZE, Patches, image_set, load_script, pkg_resources_stub, reference_state_dict,
                     stub_modules, use_checkout, write)

REPOSITORY = "kim0806/ViP2-CLIP"
COMMIT = "4b5884f"
SEED = 111  # train.py / test.py --seed
N_CTX, N_CLS, TOPK, SIGMA = 7, 3, 50, 8  # train.sh / test.sh: --n_ctx 7 --n_cls 3 --topk 50; test.py --sigma 8
LAYERS = [6, 12, 18, 24]  # --features_list
META_HIDDEN = 32  # MetaNet hidden width here (ViT-L: 384); keeps the stored weights small
FGP_QK_SCALE = 30.0  # the "big FGP weights" multiplier of the training variant
TRAIN_EPOCHS = 5  # train.py saves checkpoints from epoch 5 on (save_freq 5)
INIT_SEED = 2024  # seed of the constructor init written to vip2clip_init.npz
LABELS = (1, 0)


def fixed_masks(size: int = REF_IMAGE_SIZE) -> torch.Tensor:
    """[2, 1, S, S]: an off-centre rectangle and a small square on image 0, nothing on image 1."""
    masks = torch.zeros(2, 1, size, size)
    masks[0, 0, size // 5: size // 2, size // 4: (3 * size) // 5] = 1.0
    masks[0, 0, (2 * size) // 3: (4 * size) // 5, (2 * size) // 3: (5 * size) // 6] = 1.0
    return masks


_ImageSet = image_set(fixed_masks, LABELS)  # what train.py / test.py read from their Dataset


def _stub_unused_modules() -> None:
    stub_modules({"cv2": {}, "tabulate": {"tabulate": lambda *a, **k: ""}, **pkg_resources_stub()})


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


class _Reference:
    """The checkout's modules with the stand-ins installed (``close`` undoes them)."""

    def __init__(self, checkout: Path, workdir: Path):
        _stub_unused_modules()
        import prompt_learner
        import VIP2CLIP_lib

        for module in (prompt_learner, VIP2CLIP_lib):
            assert str(Path(module.__file__).resolve()).startswith(str(checkout)), module.__file__
        self.prompt_learner = prompt_learner
        self.train_py = load_script(checkout, "train", "vip2clip")
        self.test_py = load_script(checkout, "test", "vip2clip")
        self.workdir = workdir
        self.weights = workdir / "tiny_ref_openai.pt"
        state = reference_state_dict()
        self.joint_width = int(state["text_projection"].shape[1])
        self.text_width = int(state["ln_final.weight"].shape[0])
        torch.save(state, self.weights)
        self.patches = Patches()
        self.record: dict[str, list] = {}
        self.reset()
        reference = self
        original_load = VIP2CLIP_lib.load

        def load(name, device="cpu", design_details=None, **kwargs):
            assert name == "ViT-L/14@336px", name
            jit_load = torch.jit.load

            def not_torchscript(*args, **kw):
                raise RuntimeError("not a TorchScript archive (a plain state dict)")

            torch.jit.load = not_torchscript
            try:
                return original_load(str(reference.weights), device=device, design_details=design_details, **kwargs)
            finally:
                torch.jit.load = jit_load

        class ICA(prompt_learner.ICA):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                # the MetaNet ICA builds with ViT-L's hard-coded 768 widths, rebuilt by the same class at tiny-ref's
                first = self.cls_prompter.fc[0]
                assert (first[0].in_features, first[0].out_features, first[2].out_features) == (768, 384, 768)
                self.cls_prompter = prompt_learner.Linearlayer(
                    dim_in=reference.joint_width, dim_out=reference.text_width, k=self.n_cls, hidden_dim=META_HIDDEN,
                    use_bais=isinstance(self.cls_prompter.bias, torch.nn.Parameter))
                if reference.init_override is not None:
                    self.load_state_dict(reference.init_override["prompt_learner"])
                reference.record["ica_init"].append(_state(self))

            def forward(self, img_features):
                reference.record["ica_input"].append(img_features.detach().clone())
                return super().forward(img_features)

        class FGP(prompt_learner.FGP):
            def __init__(self, dim_v, dim_t, dim_out, **kwargs):
                assert (dim_v, dim_t, dim_out) == (768, 768, 768), (dim_v, dim_t, dim_out)
                width = reference.joint_width
                super().__init__(dim_v=width, dim_t=width, dim_out=width, **kwargs)
                if reference.init_override is not None:
                    self.load_state_dict(reference.init_override["Zero_try"])
                if reference.fgp_qk_scale != 1.0:
                    with torch.no_grad():
                        for layer in (self.q_proj_pre, self.k_proj_pre_1):
                            layer.weight.mul_(reference.fgp_qk_scale)
                            layer.bias.mul_(reference.fgp_qk_scale)
                reference.record["fgp_init"].append(_state(self))

            def forward(self, F_t, F_s):  # noqa: N803 - the reference's argument names
                out = super().forward(F_t, F_s)
                reference.record["fgp_calls"].append((F_t.detach().clone(), F_s.detach().clone(),
                                                      out.detach().clone()))
                return out

        def recorder(cls, key):
            class Recording(cls):
                def forward(self, *args, **kwargs):
                    out = super().forward(*args, **kwargs)
                    reference.record[key].append(float(out.detach()))
                    return out
            return Recording

        original_cross_entropy = self.train_py.F.cross_entropy

        def cross_entropy(*args, **kwargs):
            out = original_cross_entropy(*args, **kwargs)
            reference.record["image_ce"].append(float(out.detach()))
            return out

        def image_level_metrics(results, obj, metric):
            reference.record["results"].append({key: value for key, value in results[obj].items()})
            return 0.0

        self.fgp_qk_scale = 1.0
        self.init_override: dict | None = None
        self.ICA, self.FGP = ICA, FGP
        set_ = self.patches.set
        set_(VIP2CLIP_lib, "load", load)
        for script in (self.train_py, self.test_py):
            set_(script, "ICA", ICA)
            set_(script, "FGP", FGP)
            set_(script, "Dataset", _ImageSet)
        set_(self.train_py, "FocalLoss", recorder(self.train_py.FocalLoss, "focal"))
        set_(self.train_py, "BinaryDiceLoss", recorder(self.train_py.BinaryDiceLoss, "dice"))
        set_(self.train_py.F, "cross_entropy", cross_entropy)
        set_(self.test_py, "image_level_metrics", image_level_metrics)

    def reset(self) -> None:
        for key in ("ica_init", "ica_input", "fgp_init", "fgp_calls", "focal", "dice", "image_ce", "results"):
            self.record[key] = []

    def close(self) -> None:
        self.patches.undo()

    def args(self, **changes) -> argparse.Namespace:
        values = dict(features_list=LAYERS, image_size=REF_IMAGE_SIZE, n_ctx=N_CTX, n_cls=N_CLS, topk=TOPK,
                      feature_map_layer=[0, 1, 2, 3], seed=SEED, dataset="reference", data_path="unused",
                      train_data_path="unused", save_path=str(self.workdir / "out"), sigma=SIGMA,
                      visualize=False, metrics="image-level")
        values.update(changes)
        return argparse.Namespace(**values)

    # -- runs ------------------------------------------------------------------------------------------------------
    def constructor_checkpoint(self, seed: int) -> dict:
        """ICA and FGP as their constructors initialise them (seeded), in train.py's checkpoint format."""
        model, _ = self.prompt_learner_model()
        torch.manual_seed(seed)
        ica = self.ICA(_ImageSet.obj_list, model, {"Prompt_length": N_CTX, "Prompt_cls_length": N_CLS})
        fgp = self.FGP(dim_v=768, dim_t=768, dim_out=768)
        return {"prompt_learner": _state(ica), "Zero_try": _state(fgp)}

    def prompt_learner_model(self):
        import VIP2CLIP_lib

        return VIP2CLIP_lib.load("ViT-L/14@336px", device="cpu", design_details=None)

    def run_test(self, checkpoint: dict) -> dict[str, torch.Tensor]:
        """test.py on the 2 reference images with ``checkpoint``; the recorded arrays."""
        path = self.workdir / "checkpoint.pth"
        torch.save(checkpoint, path)
        self.reset()
        self.test_py.setup_seed(SEED)
        self.test_py.test(self.args(checkpoint_path=str(path)))
        results = self.record["results"][0]
        calls = self.record["fgp_calls"]
        assert len(calls) == len(LAYERS) * 2, len(calls)
        text, layer_text, topk = [], [], []
        for image in range(2):
            image_calls = calls[image * len(LAYERS):(image + 1) * len(LAYERS)]
            text.append(image_calls[0][0][0])
            layer_text.append(torch.stack([out[0] for _, _, out in image_calls]))
            indices = []
            for text_in, patches, out in image_calls:
                assert torch.equal(text_in, image_calls[0][0])  # one ICA text per image, every layer
                probs = ((patches @ out.transpose(1, 2)) / 0.07).softmax(dim=-1)
                indices.append(torch.topk(probs[:, :, 1], k=TOPK, dim=-1).indices[0].sort().values)
            topk.append(torch.stack(indices))
        return {
            "scores": torch.stack([torch.as_tensor(s) for s in results["pr_sp"]]).float(),
            "maps": torch.as_tensor(np.asarray(results["anomaly_maps"])),
            "global_features": torch.cat(self.record["ica_input"]),
            "text_features": torch.stack(text),
            "layer_text_features": torch.stack(layer_text),
            "topk_indices": torch.stack(topk),
        }

    def run_train(self, init: dict) -> dict[str, object]:
        """train.py, TRAIN_EPOCHS epochs of one batch, its ICA / FGP loaded with ``init`` right after construction
        and FGP's q/k weights and biases then multiplied by FGP_QK_SCALE."""
        self.reset()
        self.fgp_qk_scale = FGP_QK_SCALE
        self.init_override = init
        original_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        try:
            self.train_py.setup_seed(SEED)
            self.train_py.train(self.args(epoch=TRAIN_EPOCHS, learning_rate=1e-3, batch_size=2, print_freq=1,
                                          save_freq=TRAIN_EPOCHS))
        finally:
            torch.Tensor.cuda = original_cuda
            self.fgp_qk_scale = 1.0
            self.init_override = None
        layers = len(LAYERS)
        first = {"focal": self.record["focal"][:layers], "dice": self.record["dice"][:2 * layers],
                 "image_ce": self.record["image_ce"][0]}
        assert len(self.record["image_ce"]) == TRAIN_EPOCHS, self.record["image_ce"]
        final = torch.load(self.workdir / "out" / f"epoch_{TRAIN_EPOCHS}.pth", map_location="cpu", weights_only=True)
        return {"init": {"prompt_learner": self.record["ica_init"][0], "Zero_try": self.record["fgp_init"][0]},
                "first_step": first, "final": final}


def _flatten(checkpoint: dict, prefix: str, buffers: bool) -> dict[str, torch.Tensor]:
    out = {}
    for part, state in checkpoint.items():
        for key, value in state.items():
            if buffers or not key.startswith(("token_", "tokenized_prompts_")):
                out[f"{prefix}/{part}/{key}"] = value
    return out


def main(ref_path: str) -> None:
    checkout = use_checkout(ref_path)
    settings = {"features_list": LAYERS, "n_ctx": N_CTX, "n_cls": N_CLS, "topk": TOPK, "sigma": SIGMA,
                "meta_hidden": META_HIDDEN, "labels": list(LABELS), "seed": SEED}
    with tempfile.TemporaryDirectory() as folder:
        reference = _Reference(checkout, Path(folder))
        try:
            init_checkpoint = reference.constructor_checkpoint(INIT_SEED)
            arrays = reference.run_test(init_checkpoint)
            arrays.update(_flatten(init_checkpoint, "ckpt", buffers=True))
            write("vip2clip_init", arrays, checkout, REPOSITORY, COMMIT,
                  dict(settings, init_seed=INIT_SEED, fgp_qk_scale=1.0))

            trained = reference.run_train(init_checkpoint)
            arrays = reference.run_test(trained["final"])
            arrays.update(_flatten(trained["final"], "final", buffers=False))
            first = trained["first_step"]
            arrays.update({"train_masks": fixed_masks()[:, 0], "train_labels": torch.tensor(LABELS),
                           "loss_focal": torch.tensor(first["focal"]), "loss_dice": torch.tensor(first["dice"]),
                           "loss_image_ce": torch.tensor(first["image_ce"])})
            write("vip2clip_trained", arrays, checkout, REPOSITORY, COMMIT,
                  dict(settings, fgp_qk_scale=FGP_QK_SCALE, epochs=TRAIN_EPOCHS, batch_size=2, lr=1e-3,
                       fgp_lr=1e-5))
        finally:
            reference.close()
