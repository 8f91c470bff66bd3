"""BatchNorm towers in train mode see each image slot's own batch statistics, as the release's separate
model calls give them: features, losses, gradients and running statistics equal a per-slot reference
(fp64), with gradient checkpointing, accumulation, partly locked towers and DDP; other towers keep one call."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _train_data import make_dataset, one_torch_thread  # noqa: F401 (autouse fixture)

from clip.clip import create_model
from training.data import resolve_paths
from training.dataset import build_train_dataset
from training.distributed import DistEnv
from training.params import parse_args
from training.terms import (
    AGREE_TERMS,
    IMAGE_SLOTS,
    TEXT_SLOTS,
    enabled_terms,
    loss_terms,
    total_loss,
)
from training.train import StepConfig, accumulate_gradients, compute_loss, encode_batch

ALL_FLAGS = ("--is-prompt", "--is-mask", "--is-da-loss", "--is-da-mask", "--is-vg")
CFG = StepConfig(terms=AGREE_TERMS, env=DistEnv())
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Four examples of the tiny dataset with every slot: the image slots differ in their statistics
    (uint8 and float images, half-masked grounding images, all-zero masked VG images)."""
    paths = make_dataset(tmp_path_factory.mktemp("bn"), n_images=4, caps_per_image=1, n_val=2)
    args = parse_args(["--train-data", str(paths["train"]), "--model", "tiny-rn", *ALL_FLAGS])
    dset = build_train_dataset(args, resolve_paths(args), enabled_terms(args), 64)
    return torch.utils.data.default_collate([dset[i] for i in range(4)])


def _resnet():
    torch.manual_seed(0)
    model = create_model("tiny-rn").double().train()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # the ranking terms are active at this scale
    return model


def release_features(model, batch):
    """What the release computes: one model call per image slot (image, VG image, masked VG image,
    grounding-masked image, in this order), each text slot on its own; L2-normalised."""
    feats = {}
    for k in IMAGE_SLOTS:
        feats[k] = F.normalize(model.encode_image(batch[k].double()), dim=-1)
    for k in TEXT_SLOTS:
        t = batch[k]
        f = F.normalize(model.encode_text(t.flatten(0, 1) if t.dim() == 3 else t), dim=-1)
        feats[k] = f.view(t.shape[0], t.shape[1], -1) if t.dim() == 3 else f
    return feats


def release_loss(model, micro_batches):
    """(total, terms) over the concatenated micro-batches, each encoded slot by slot as the release does."""
    per = [release_features(model, mb) for mb in micro_batches]
    feats = {k: torch.cat([p[k] for p in per]) for k in per[0]}
    values = loss_terms(feats, model.logit_scale.exp(), AGREE_TERMS)
    return total_loss(values), values


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(got, want, what, tol=1e-10):
    assert set(got) == set(want), what
    for name, w in want.items():
        g = got[name]
        if not torch.is_floating_point(w):
            assert torch.equal(g, w), (what, name)
            continue
        err = (g - w).abs().max().item()
        assert err <= tol * max(w.abs().max().item(), 1.0), (what, name, err)


def _bn_state(model):
    return {n: b.clone() for n, b in model.named_buffers() if "bn" in n or "downsample.1" in n}


def _split(batch, k):
    b = batch["image"].shape[0] // k
    return [{key: v[i * b : (i + 1) * b] for key, v in batch.items()} for i in range(k)]


def _compare_step(project, reference, batch, micro=1):
    """One backward pass each; features (single pass only), losses, gradients and BN buffers agree."""
    if micro == 1:
        with torch.no_grad():
            got_f, _ = encode_batch(copy.deepcopy(project), batch, CPU, torch.float64)
            want_f = release_features(copy.deepcopy(reference), batch)
        _assert_close(got_f, want_f, "features")
        total, values = compute_loss(project, batch, CFG)
        total.backward()
    else:
        total, values = accumulate_gradients(project, _split(batch, micro), CFG)
    want_total, want_values = release_loss(reference, _split(batch, micro))
    want_total.backward()
    _assert_close(values, want_values, "loss terms")
    assert all(want_values[t].item() > 0 for t in ("global", "prompt", "vg_contrastive"))
    _assert_close(_grads(project), _grads(reference), "gradients")
    _assert_close(_bn_state(project), _bn_state(reference), "BatchNorm buffers")


def test_resnet_in_train_mode_matches_one_call_per_slot(batch):
    reference = _resnet()
    project = copy.deepcopy(reference)
    _compare_step(project, reference, batch)
    # each of the four slots counted once in the running statistics, as four release calls count them
    assert project.visual.bn1.num_batches_tracked.item() == len(IMAGE_SLOTS)


def test_one_call_over_all_slots_would_differ(batch):
    """The check has teeth: a single tower call over the mixed slots gives other features and statistics."""
    reference, mixed = _resnet(), _resnet()
    with torch.no_grad():
        want = release_features(reference, batch)
        images = torch.stack([batch[k].double() for k in IMAGE_SLOTS], dim=1).flatten(0, 1)
        got = F.normalize(mixed.encode_image(images), dim=-1).view(4, len(IMAGE_SLOTS), -1)
    worst = max((got[:, i] - want[k]).abs().max().item() for i, k in enumerate(IMAGE_SLOTS))
    assert worst > 1e-2, worst
    diff = (mixed.visual.bn1.running_mean - reference.visual.bn1.running_mean).abs().max().item()
    assert diff > 1e-3, diff


def test_with_gradient_checkpointing(batch):
    reference = _resnet()
    project = copy.deepcopy(reference)
    project.set_grad_checkpointing(True)
    _compare_step(project, reference, batch)


def test_with_accumulated_micro_batches(batch):
    """--accum-freq 2: the cached no-grad pass leaves the running statistics alone; the passes with
    gradient count each micro-batch's slots once, in order, as two release steps' calls would."""
    reference = _resnet()
    project = copy.deepcopy(reference)
    _compare_step(project, reference, batch, micro=2)
    assert project.visual.bn1.num_batches_tracked.item() == 2 * len(IMAGE_SLOTS)


def test_with_a_partly_locked_image_tower(batch):
    """--lock-image --lock-image-unlocked-groups 2: the last ResNet stage trains, its BatchNorm in train mode."""
    reference = _resnet()
    reference.lock_image_tower(unlocked_groups=2)
    project = copy.deepcopy(reference)
    assert project.visual.layer4[0].bn1.training and not project.visual.layer1[0].bn1.training
    _compare_step(project, reference, batch)


def test_under_ddp(batch, tmp_path):
    """The wrapped model gets the per-slot call through DDP's forward (one process, gloo)."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        reference = _resnet()
        project = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(reference))
        total, values = compute_loss(project, batch, CFG)
        total.backward()
        want_total, want_values = release_loss(reference, [batch])
        want_total.backward()
        _assert_close(values, want_values, "loss terms")
        _assert_close(_grads(project.module), _grads(reference), "gradients")
        _assert_close(_bn_state(project.module), _bn_state(reference), "BatchNorm buffers")
    finally:
        dist.destroy_process_group()


def _tower_calls(model, batch):
    calls = []
    hook = model.visual.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        total, _ = compute_loss(model, batch, CFG)
        total.backward()
    finally:
        hook.remove()
    return calls


@pytest.mark.parametrize("case", ["vit", "locked-resnet", "eval-resnet"])
def test_other_towers_keep_one_call_over_all_slots(batch, case):
    """ViTs, locked or eval-mode ResNets: rows do not depend on each other, so every slot goes in one call
    (and the values are still the per-slot reference's)."""
    torch.manual_seed(0)
    model = (create_model("tiny") if case == "vit" else create_model("tiny-rn")).double().train()
    if case == "locked-resnet":
        model.lock_image_tower()
    if case == "eval-resnet":
        model.eval()
    reference = copy.deepcopy(model)
    assert _tower_calls(model, batch) == [4 * len(IMAGE_SLOTS)]
    total, _ = release_loss(reference, [batch])
    total.backward()
    _assert_close(_grads(model), _grads(reference), "gradients", tol=1e-9)
    _assert_close(_bn_state(model), _bn_state(reference), "BatchNorm buffers")


def test_resnet_in_train_mode_calls_the_tower_once_per_slot(batch):
    assert _tower_calls(_resnet(), batch) == [4] * len(IMAGE_SLOTS)
