"""The training engine on the tiny random-weight backbone (112 px): frozen backbone, deterministic resume,
checkpoint files and loading, bad input."""
import json
import random
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from zsadlib.data import AnomalyDataset, open_dataset
from zsadlib.methods import MethodError, build_method
from zsadlib.losses import image_cross_entropy
from zsadlib.methods.base import AnomalyMethod, MethodConfig, MethodOutput
from zsadlib.train import (
    CheckpointError,
    TrainConfig,
    TrainingError,
    TrainingWarning,
    epoch_order,
    load_checkpoint,
    train,
)

from .conftest import TINY_SIZE

CLASSES = ["bottle", "carpet"]


# ---- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_set(synthetic_root):
    """8 images: 2 classes x (2 normal + 2 anomalous); batch 3 gives 3 steps per epoch (3, 3, 2)."""
    return open_dataset("synthetic", synthetic_root, classes=CLASSES, image_size=TINY_SIZE).subset(max_per_class=4)


@pytest.fixture(scope="module")
def text_cache(tiny_backbone):
    """Prompt-ensemble embeddings depend only on the frozen backbone: encode them once for every fresh method."""
    method = build_method("april_gan", backbone=tiny_backbone)
    method.text_features(CLASSES)
    return dict(method._text_cache)


@pytest.fixture
def fresh(tiny_backbone, text_cache):
    def make(**overrides):
        method = build_method("april_gan", backbone=tiny_backbone, **overrides)
        method._text_cache.update(text_cache)
        return method

    return make


def quick_config(**overrides):
    values = dict(epochs=2, batch_size=3, lr=1e-2, seed=5, checkpoint_every=2)
    values.update(overrides)
    return TrainConfig(**values)


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def learned_copy(method):
    return {name: tensor.detach().clone() for name, tensor in method.learned_state_dict().items()}


class ImageOnlyToy(AnomalyMethod):
    """A minimal trainable method with an image loss (and a pixel term only when masks are given); records the
    masks it was given. Not registered."""

    name = "toy_image_head"
    trainable = True

    def __init__(self, config, backbone):
        super().__init__(config, backbone)
        self.head = torch.nn.Linear(backbone.embed_dim, 2)
        self.seen_masks = []

    def _logits(self, images):
        with torch.no_grad():
            features = self.backbone.forward_features(images, layers=(self.backbone.num_layers,))
        return self.head(features.global_embedding)

    def forward(self, images, class_names=None):
        scores = self._logits(images).softmax(-1)[:, 1]
        return MethodOutput(scores=scores, maps=scores[:, None, None].expand(-1, *images.shape[-2:]))

    def training_loss(self, images, masks, labels, class_names):
        self.seen_masks.append(masks)
        loss = image_cross_entropy(self._logits(images), labels)
        parts = {"image": float(loss.detach())}
        if masks is not None:
            pixel = masks.float().mean()
            loss = loss + pixel
            parts["pixel"] = float(pixel)
        return loss, parts


# ---- config ----------------------------------------------------------------------------------------------------
def test_config_from_method_takes_the_paper_values(fresh):
    method = fresh()
    config = TrainConfig.from_method(method)
    assert (config.epochs, config.batch_size, config.lr, config.betas, config.seed) == (15, 8, 1e-3, (0.5, 0.999), 111)
    changed = TrainConfig.from_method(method, epochs=2, lr=0.01)
    assert changed.epochs == 2 and changed.lr == 0.01 and changed.batch_size == 8
    with pytest.raises(TrainingError, match="unknown TrainConfig fields"):
        TrainConfig.from_method(method, epochz=3)
    with pytest.raises(TrainingError, match="precision"):
        train(method, [], "unused", TrainConfig(precision="fp8"))


def test_epoch_order_is_a_seeded_permutation():
    first = epoch_order(10, seed=3, epoch=0)
    assert sorted(first.tolist()) == list(range(10))
    assert torch.equal(first, epoch_order(10, seed=3, epoch=0))
    assert not torch.equal(first, epoch_order(10, seed=3, epoch=1))
    assert not torch.equal(first, epoch_order(10, seed=4, epoch=0))


# ---- frozen backbone, learned parameters change -------------------------------------------------------------
def test_backbone_stays_bit_identical_and_learned_parameters_change(fresh, small_set, tmp_path):
    method = fresh()
    backbone_before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    learned_before = learned_copy(method)
    result = train(method, small_set, tmp_path, quick_config(max_steps=2), progress=False)
    assert result.finished and result.step == 2
    for key, value in method.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    assert all(not p.requires_grad for p in method.backbone.parameters())
    assert not method.backbone.model.training and not method.training
    changed = [name for name, value in method.learned_state_dict().items()
               if not torch.equal(value, learned_before[name])]
    assert sorted(changed) == sorted(learned_before)


# ---- deterministic resume -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tiny_backbone, text_cache, small_set, tmp_path_factory):
    """Run A: 2 epochs x 3 steps, no interruption."""
    method = build_method("april_gan", backbone=tiny_backbone)
    method._text_cache.update(text_cache)
    run_dir = tmp_path_factory.mktemp("run_a")
    result = train(method, small_set, run_dir, quick_config(), progress=False)
    return method, run_dir, result


class Kill(KeyboardInterrupt):
    pass


def test_resume_after_a_kill_is_bit_identical(uninterrupted, fresh, small_set, tmp_path):
    method_a, dir_a, result_a = uninterrupted
    assert result_a.finished and result_a.step == 6 and result_a.epoch == 2

    # Run B: killed right after step 5. Checkpoints exist after steps 2, 3 (epoch end) and 4; the records of
    # step 5 reach the log but no checkpoint does.
    def kill_after_five(record):
        if record["step"] == 5:
            raise Kill

    method_b = fresh()
    with pytest.raises(Kill):
        train(method_b, small_set, tmp_path, quick_config(), progress=False, callback=kill_after_five)
    last = json.loads((tmp_path / "checkpoints" / "last.json").read_text())
    assert (last["step"], last["epoch"], last["batch_in_epoch"]) == (4, 1, 1)
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "learned.safetensors").exists()

    # a new process: a fresh method object (its adapters differ from B's state until the checkpoint loads)
    method_c = fresh()
    result = train(method_c, small_set, tmp_path, quick_config(), progress=False)
    assert result.resumed_from_step == 4 and result.finished and result.step == 6
    assert [r["step"] for r in result.history] == [5, 6]
    for name, value in method_a.learned_state_dict().items():
        assert torch.equal(method_c.learned_state_dict()[name], value), name

    # the log holds every step once (step 5 of the killed run was truncated on resume), with A's losses
    log_a, log_c = read_log(dir_a), read_log(tmp_path)
    assert [r["step"] for r in log_c] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log_c] == [r["loss"] for r in log_a]
    assert [r["epoch"] for r in log_c] == [0, 0, 0, 1, 1, 1]
    assert set(log_c[0]) >= {"epoch", "step", "batch", "loss", "parts", "lr", "seconds"}
    final_a = load_file(str(dir_a / "learned.safetensors"))
    final_c = load_file(str(tmp_path / "learned.safetensors"))
    assert all(torch.equal(final_a[k], final_c[k]) for k in final_a)


class DrawingToy(ImageOnlyToy):
    """A toy whose loss draws from one global RNG at every step (as a method with dropout or a random
    augmentation would): a resumed run repeats the uninterrupted one only if the checkpoint restores that RNG."""

    name = "toy_drawing"

    def __init__(self, config, backbone, source):
        super().__init__(config, backbone)
        self.source = source
        self.head = torch.nn.Linear(3, 2)

    def _logits(self, images):
        return self.head(images.mean(dim=(2, 3)))

    def training_loss(self, images, masks, labels, class_names):
        if self.source == "torch":
            noise = torch.randn(len(images), 2)
        elif self.source == "numpy":
            noise = torch.from_numpy(np.random.standard_normal((len(images), 2))).float()
        else:
            noise = torch.tensor([[random.gauss(0.0, 1.0) for _ in range(2)] for _ in images])
        loss = image_cross_entropy(self._logits(images) + noise, labels)
        return loss, {"image": float(loss.detach())}


def scramble_global_rngs(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.mark.parametrize("source", ["torch", "numpy", "python"])
def test_resume_restores_the_global_rng_state(source, small_set, tiny_backbone, tmp_path):
    def toy():
        method = DrawingToy(MethodConfig(backbone="tiny", pretrained=None, image_size=TINY_SIZE), tiny_backbone,
                            source)
        torch.nn.init.constant_(method.head.weight, 0.1)  # one start for every run
        torch.nn.init.constant_(method.head.bias, 0.0)
        return method

    config = quick_config(checkpoint_every=2)
    scramble_global_rngs(1)
    train(toy(), small_set, tmp_path / "a", config, progress=False)

    def kill_after_five(record):
        if record["step"] == 5:
            raise Kill

    scramble_global_rngs(2)
    with pytest.raises(Kill):
        train(toy(), small_set, tmp_path / "b", config, progress=False, callback=kill_after_five)
    scramble_global_rngs(3)  # a new process: its global RNGs are wherever they are
    resumed = train(toy(), small_set, tmp_path / "b", config, progress=False)
    assert resumed.resumed_from_step == 4 and resumed.finished
    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["step"] for r in log_b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log_b] == [r["loss"] for r in log_a]
    # and the draws matter: a fresh run from other global RNG states gives other losses
    with torch.no_grad():
        scramble_global_rngs(4)
        one = toy().training_loss(torch.ones(2, 3, 4, 4), None, torch.tensor([0, 1]), ["a", "b"])[0]
        two = toy().training_loss(torch.ones(2, 3, 4, 4), None, torch.tensor([0, 1]), ["a", "b"])[0]
    assert float(one) != float(two)


def test_stop_after_steps_writes_nothing_extra_and_resumes(uninterrupted, fresh, small_set, tmp_path):
    method_a, _, _ = uninterrupted
    stopped = train(fresh(), small_set, tmp_path, quick_config(checkpoint_every=None), progress=False,
                    stop_after_steps=2)
    assert stopped.interrupted and not stopped.finished and stopped.learned is None
    assert not (tmp_path / "checkpoints" / "last.json").exists()  # no periodic checkpoint yet: nothing survives
    assert len(read_log(tmp_path)) == 2
    resumed = train(fresh(), small_set, tmp_path, quick_config(checkpoint_every=None), progress=False)
    assert resumed.resumed_from_step is None and resumed.step == 6  # started over, log rewritten
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5, 6]
    final = load_file(str(tmp_path / "learned.safetensors"))
    for name, value in method_a.learned_state_dict().items():
        assert torch.equal(final[name], value), name


def test_resuming_a_finished_run_does_nothing(uninterrupted, fresh, small_set):
    _, run_dir, _ = uninterrupted
    method = fresh()
    result = train(method, small_set, run_dir, quick_config(), progress=False)
    assert result.finished and result.resumed_from_step == 6 and result.history == []
    assert len(read_log(run_dir)) == 6


def test_resume_refuses_another_setup(uninterrupted, fresh, small_set, tmp_path):
    _, run_dir, _ = uninterrupted
    with pytest.raises(TrainingError, match="batch_size 3 .* != 4"):
        train(fresh(), small_set, run_dir, quick_config(batch_size=4), progress=False)
    other = small_set.subset(max_per_class=2)
    with pytest.raises(TrainingError, match="dataset differs"):
        train(fresh(), other, run_dir, quick_config(), progress=False)


def test_resume_false_starts_over(uninterrupted, fresh, small_set, tmp_path):
    train(fresh(), small_set, tmp_path, quick_config(max_steps=2), progress=False)
    result = train(fresh(), small_set, tmp_path, quick_config(max_steps=1), progress=False, resume=False)
    assert result.resumed_from_step is None and result.step == 1
    assert [r["step"] for r in read_log(tmp_path)] == [1]


# ---- checkpoint files -------------------------------------------------------------------------------------------
def test_checkpoint_files_and_metadata(uninterrupted):
    method, run_dir, _ = uninterrupted
    ckpt = run_dir / "checkpoints"
    for name in ("last.safetensors", "last.json", "optimizer.pt"):
        assert (ckpt / name).is_file(), name
    meta = json.loads((run_dir / "learned.json").read_text())
    assert meta["method"] == "april_gan" and meta["final"] is True
    assert meta["method_config"]["layers"] == [6, 12, 18, 24]
    assert meta["backbone"]["name"] == "tiny" and "weights_sha256" in meta["backbone"]
    assert meta["image_size"] == TINY_SIZE
    assert meta["versions"]["torch"] != "not installed" and "python" in meta["versions"]
    assert (meta["epoch"], meta["step"], meta["seed"]) == (2, 6, 5)
    assert meta["dataset"]["classes"] == sorted(CLASSES) and meta["dataset"]["images"] == 8
    assert meta["train_config"]["batch_size"] == 3
    assert meta["parameters"]["adapters.0.weight"] == [method.backbone.embed_dim, method.backbone.vision_width]
    tensors = load_file(str(run_dir / "learned.safetensors"))
    assert set(tensors) == set(method.learned_parameters())
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())
    state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 6 and "state" in state["optimizer"] and "torch" in state["rng"]


def test_checkpoint_round_trip_gives_identical_outputs(uninterrupted, fresh, tiny_images):
    method, run_dir, _ = uninterrupted
    other = fresh(seed=999)  # different initial adapters
    names = ["bottle", "carpet", "bottle"]
    assert not torch.equal(other(tiny_images, names).maps, method(tiny_images, names).maps)
    meta = other.load_checkpoint(str(run_dir))  # the run directory -> learned.safetensors
    assert meta["step"] == 6
    with torch.no_grad():
        expected, got = method(tiny_images, names), other(tiny_images, names)
    assert torch.equal(got.maps, expected.maps) and torch.equal(got.scores, expected.scores)
    last = load_checkpoint(fresh(), run_dir / "checkpoints" / "last.safetensors")
    assert last["step"] == 6


def test_load_reads_on_cpu_whatever_device_saved_it(uninterrupted, fresh, tmp_path, monkeypatch):
    _, run_dir, _ = uninterrupted
    target = tmp_path / "from_cuda.safetensors"
    target.write_bytes((run_dir / "learned.safetensors").read_bytes())
    meta = json.loads((run_dir / "learned.json").read_text())
    meta["saved_from_device"] = meta["trained_on_device"] = "cuda:0"
    (tmp_path / "from_cuda.json").write_text(json.dumps(meta))
    import safetensors.torch

    calls = []
    real = safetensors.torch.load_file

    def spy(path, device="cpu"):
        calls.append(device)
        return real(path, device=device)

    monkeypatch.setattr(safetensors.torch, "load_file", spy)
    method = fresh(seed=3)
    load_checkpoint(method, target)
    assert calls == ["cpu"]
    reference = load_file(str(run_dir / "learned.safetensors"))
    assert all(torch.equal(method.learned_state_dict()[k], reference[k]) for k in reference)


def test_load_errors_name_the_file(uninterrupted, fresh, tiny_backbone, tmp_path):
    _, run_dir, _ = uninterrupted
    weights = run_dir / "learned.safetensors"
    # another method
    winclip = build_method("winclip", backbone=tiny_backbone)
    with pytest.raises(CheckpointError, match=r"learned\.safetensors.*'april_gan', not 'winclip'"):
        load_checkpoint(winclip, weights)
    # fewer layers -> unexpected keys
    with pytest.raises(MethodError, match=r"learned\.safetensors does not fit april_gan: unexpected"), \
            pytest.warns(UserWarning, match="config layers"):
        load_checkpoint(fresh(layers=(6, 12)), weights)
    # same keys, wrong shapes
    bad = tmp_path / "bad.safetensors"
    tensors = load_file(str(weights))
    save_file({k: torch.zeros(*(s + 1 for s in v.shape)) for k, v in tensors.items()}, str(bad))
    (tmp_path / "bad.json").write_text((run_dir / "learned.json").read_text())
    with pytest.raises(MethodError, match=r"bad\.safetensors does not fit april_gan: shape mismatch"):
        load_checkpoint(fresh(), bad)
    # missing files
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_checkpoint(fresh(), tmp_path / "nowhere.safetensors")
    with pytest.raises(FileNotFoundError, match="no checkpoint in run directory"):
        load_checkpoint(fresh(), tmp_path)
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(weights.read_bytes())
    with pytest.raises(FileNotFoundError, match="lonely.json"):
        load_checkpoint(fresh(), lonely)


def test_load_warns_about_another_backbone(uninterrupted, tmp_path, fresh):
    _, run_dir, _ = uninterrupted
    meta = json.loads((run_dir / "learned.json").read_text())
    meta["backbone"]["name"] = "ViT-L-14-336"
    (tmp_path / "w.json").write_text(json.dumps(meta))
    (tmp_path / "w.safetensors").write_bytes((run_dir / "learned.safetensors").read_bytes())
    with pytest.warns(UserWarning, match="backbone name 'ViT-L-14-336' != 'tiny'"):
        load_checkpoint(fresh(), tmp_path / "w.safetensors")


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_dataset_without_masks_warns_and_trains_the_image_loss_only(small_set, tiny_backbone, tmp_path):
    no_masks = AnomalyDataset(small_set.records, kind="synthetic", root=small_set.root, has_masks=False,
                              image_size=TINY_SIZE)
    toy = ImageOnlyToy(MethodConfig(backbone="tiny", pretrained=None, image_size=TINY_SIZE), tiny_backbone)
    with pytest.warns(TrainingWarning, match="no pixel masks"):
        result = train(toy, no_masks, tmp_path, quick_config(max_steps=3), progress=False)
    assert result.finished and toy.seen_masks == [None, None, None]
    assert all(set(record["parts"]) == {"image"} for record in read_log(tmp_path))
    # APRIL-GAN has no image loss: it says so instead of silently learning nothing
    method = build_method("april_gan", backbone=tiny_backbone)
    with pytest.warns(TrainingWarning), pytest.raises(MethodError, match="only from pixel masks"):
        train(method, no_masks, tmp_path / "april", quick_config(max_steps=1), progress=False)


def test_masks_are_passed_when_present(small_set, tiny_backbone, tmp_path):
    toy = ImageOnlyToy(MethodConfig(backbone="tiny", pretrained=None, image_size=TINY_SIZE), tiny_backbone)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingWarning)
        train(toy, small_set, tmp_path, quick_config(max_steps=1), progress=False)
    assert toy.seen_masks[0].shape == (3, TINY_SIZE, TINY_SIZE) and toy.seen_masks[0].dtype == torch.bool


def test_single_label_and_empty_datasets_are_refused(small_set, fresh, tmp_path):
    normal_only = small_set.with_records([r for r in small_set.records if r.label == 0])
    with pytest.raises(TrainingError, match=rf"{small_set.root}.*only normal"):
        train(fresh(), normal_only, tmp_path, quick_config(), progress=False)
    empty = small_set.with_records([])
    with pytest.raises(TrainingError, match=rf"{small_set.root} is empty"):
        train(fresh(), empty, tmp_path, quick_config(), progress=False)
    assert not (tmp_path / "log.jsonl").exists()


def test_wrong_image_size_and_training_free_methods_are_refused(small_set, tiny_backbone, fresh, tmp_path):
    with pytest.raises(TrainingError, match="training-free"):
        train(build_method("winclip", backbone=tiny_backbone), small_set, tmp_path, quick_config(), progress=False)
    big = open_dataset("synthetic", small_set.root, classes=CLASSES, image_size=224).subset(max_per_class=2)
    with pytest.raises(TrainingError, match="image_size=112"):
        train(fresh(), big, tmp_path, quick_config(), progress=False)
