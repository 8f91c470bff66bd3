"""Memory levers of fine-tuning: gradient checkpointing, accumulation with cached features, bf16, locked towers,
gradient clipping. Each is checked against the plain computation it must reproduce (or bound)."""

import copy
import shutil

import pytest
import torch
from _scripts import load_script
from _train_data import make_dataset, one_torch_thread, train_argv  # noqa: F401 (autouse fixture)

from agree.io import InputError
from agree.precision import autocast, resolve_precision, weight_dtype
from clip.clip import create_model
from clip.model import CLIP
from training import checkpoint as C
from training.data import resolve_paths
from training.dataset import build_train_dataset
from training.distributed import DistEnv
from training.engine import build_model, build_optimizer, lock_towers, run
from training.params import build_parser, parse_args
from training.terms import AGREE_TERMS, IMAGE_SLOTS, enabled_terms
from training.train import StepConfig, accumulate_gradients, compute_loss, train_step

ALL_FLAGS = ("--is-prompt", "--is-mask", "--is-da-loss", "--is-da-mask", "--is-vg")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("mem"), n_images=4, caps_per_image=2, n_val=2)


def _batch(paths, n, *flags):
    """The first n examples of the tiny dataset, collated, with the slots of `flags`' terms."""
    args = parse_args(["--train-data", str(paths["train"]), "--model", "tiny", *flags])
    dset = build_train_dataset(args, resolve_paths(args), enabled_terms(args), 64)
    return torch.utils.data.default_collate([dset[i] for i in range(n)])


def _split(batch, k):
    """k consecutive micro-batches of the batch."""
    b = batch["image"].shape[0] // k
    return [{key: v[i * b : (i + 1) * b] for key, v in batch.items()} for i in range(k)]


def _tiny_resnet() -> CLIP:
    return CLIP(
        embed_dim=32,
        image_resolution=64,
        vision_layers=[1, 1, 1, 1],
        vision_width=16,
        vision_patch_size=None,
        context_length=77,
        vocab_size=49408,
        transformer_width=32,
        transformer_heads=1,
        transformer_layers=2,
    )


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got, want, rel=1e-6):
    assert set(got) == set(want)
    for name, g in want.items():
        err = (got[name] - g).abs().max().item()
        assert err <= rel * max(g.abs().max().item(), 1e-12), (name, err, g.abs().max().item())


CFG = StepConfig(terms=AGREE_TERMS, env=DistEnv())


def test_the_levers_have_their_openclip_flag_names():
    help_text = build_parser().format_help()
    for flag in (
        "--grad-checkpointing",
        "--accum-freq",
        "--precision",
        "--lock-image",
        "--lock-text",
        "--lock-image-unlocked-groups",
        "--lock-text-unlocked-groups",
        "--grad-clip-norm",
    ):
        assert f"  {flag} " in help_text or f"  {flag}\n" in help_text, flag
    assert "{amp,amp_bf16,bf16,fp16,fp32}" in help_text
    args = parse_args(["--train-data", "x.jsonl"])
    assert (
        args.accum_freq,
        args.grad_checkpointing,
        args.grad_clip_norm,
        args.lock_image,
        args.lock_text,
    ) == (1, False, None, False, False)


# --------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_grad_checkpointing_gives_the_plain_gradients_and_keeps_fewer_activations(data, tower):
    batch = _batch(data, 4, *ALL_FLAGS)
    torch.manual_seed(0)
    plain = (create_model("tiny") if tower == "vit" else _tiny_resnet()).double().train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)

    saved = {}
    for name, model in (("plain", plain), ("ckpt", ckpt)):
        count = [0]

        def pack(t, count=count):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            total, _ = compute_loss(model, batch, CFG)
        total.backward()
        saved[name] = count[0]
    _assert_same_grads(_grads(ckpt), _grads(plain))
    assert len(_grads(plain)) == len(list(plain.parameters()))
    # activations inside the blocks (stages) are not kept for backward
    assert saved["ckpt"] < 0.5 * saved["plain"], saved
    # recomputation does not count a batch twice in the BatchNorm running statistics
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        assert torch.equal(a, b), name
    if tower == "resnet":  # once per image slot (each slot is its own tower call in train mode)
        assert plain.visual.layer1[0].bn1.num_batches_tracked.item() == len(IMAGE_SLOTS)
    # no gradient asked for: the blocks run as usual
    with torch.no_grad():
        assert torch.equal(ckpt.encode_text(batch["text"]), plain.encode_text(batch["text"]))


# --------------------------------------------------------------------------- accumulation
def test_accum_freq_equals_one_step_at_k_times_the_batch_for_all_six_terms(data):
    k, b = 3, 2
    batch = _batch(data, k * b, *ALL_FLAGS)
    torch.manual_seed(0)
    model = create_model("tiny").double().train()
    with torch.no_grad():
        model.logit_scale.fill_(
            2.0
        )  # terms of comparable size; the ranking terms are active at this scale

    big_total, big_values = compute_loss(model, batch, CFG)
    big_total.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    total, values = accumulate_gradients(model, _split(batch, k), CFG)
    assert set(values) == {"global", *AGREE_TERMS}
    for name in values:
        assert values[name].item() == pytest.approx(big_values[name].item(), rel=1e-9, abs=1e-12), (
            name
        )
    assert total.item() == pytest.approx(big_total.item(), rel=1e-9)
    assert all(values[t].item() > 0 for t in ("global", "prompt", "vg_contrastive")), values
    _assert_same_grads(_grads(model), want)
    assert want["logit_scale"].abs().item() > 1e-6  # counted once, not once per micro-batch

    # the check has teeth: one micro-batch alone gives other contrastive values than the accumulated batch
    alone, alone_values = compute_loss(model, _split(batch, k)[0], CFG)
    assert abs(alone_values["global"].item() - big_values["global"].item()) > 1e-3


def test_train_step_over_micro_batches_is_one_update(data):
    k, b = 2, 2
    batch = _batch(data, k * b, "--is-prompt", "--is-vg")
    cfg = StepConfig(terms=("prompt", "grounding_mask"), env=DistEnv())
    torch.manual_seed(0)
    one = create_model("tiny").double()
    acc = copy.deepcopy(one)
    opt_one = torch.optim.SGD(one.parameters(), lr=0.1)
    opt_acc = torch.optim.SGD(acc.parameters(), lr=0.1)
    l_one = train_step(one, batch, opt_one, None, cfg)
    l_acc = train_step(acc, _split(batch, k), opt_acc, None, cfg)
    assert l_acc == pytest.approx(l_one, rel=1e-9)
    for (name, p), q in zip(one.named_parameters(), acc.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-9), name


def _losses(history):
    return [h for _, h in history]


def test_accum_freq_run_matches_the_large_batch_run_and_resumes_mid_epoch(
    data, tmp_path, monkeypatch
):
    mid = tmp_path / "mid.pt"
    save = C.save_checkpoint

    def keep_mid_epoch_checkpoint(
        state, path
    ):  # epoch_latest.pt is overwritten at the end of the epoch
        out = save(state, path)
        if state["step"] == 1:
            shutil.copy(out, mid)
        return out

    monkeypatch.setattr(C, "save_checkpoint", keep_mid_epoch_checkpoint)

    def argv(name, *extra, batch_size):
        a = train_argv(
            data,
            tmp_path,
            name,
            "--is-prompt",
            "--is-mask",
            "--is-vg",
            "--save-frequency",
            "1",
            *extra,
            batch_size=batch_size,
            epochs=1,
        )
        i = a.index("--val-data")
        return a[:i] + a[i + 2 :]

    big = run(parse_args(argv("big", batch_size=4)), DistEnv(), keep_history=True)
    acc = run(
        parse_args(
            argv(
                "acc",
                "--accum-freq",
                "2",
                "--grad-checkpointing",
                "--save-every-n-steps",
                "1",
                batch_size=2,
            )
        ),
        DistEnv(),
        keep_history=True,
    )
    # 8 examples, 4 per optimiser step: 2 steps, the same global batches in the same order
    assert [s for s, _ in acc.history] == [s for s, _ in big.history] == [1, 2]
    for a, b in zip(_losses(acc.history), _losses(big.history)):
        assert a == pytest.approx(b, rel=2e-5, abs=1e-6)
    log = (tmp_path / "acc" / "out.log").read_text()
    assert "[1/2] step 1" in log and "[2/2] step 2" in log
    wa = torch.load(tmp_path / "acc" / "checkpoints" / "epoch_1.pt", weights_only=True)[
        "state_dict"
    ]
    wb = torch.load(tmp_path / "big" / "checkpoints" / "epoch_1.pt", weights_only=True)[
        "state_dict"
    ]
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5

    # the mid-epoch checkpoint (after step 1 = micro-batches 1-2) resumes at micro-batch 3
    assert torch.load(mid, weights_only=True)["step"] == 1
    resumed = run(
        parse_args(argv("resumed", "--accum-freq", "2", "--resume", str(mid), batch_size=2)),
        DistEnv(),
        keep_history=True,
    )
    assert [s for s, _ in resumed.history] == [2]
    assert _losses(resumed.history)[0] == pytest.approx(_losses(acc.history)[1], rel=1e-6)


def test_accum_freq_flag_errors(data, tmp_path):
    with pytest.raises(InputError, match="--accum-freq must be >= 1"):
        parse_args(["--train-data", "x.jsonl", "--accum-freq", "0"])
    small = train_argv(data, tmp_path, "toobig", "--accum-freq", "3", batch_size=4)
    with pytest.raises(
        InputError, match=r"fewer than one global batch \(4 x 3 micro-batches x 1 ranks\)"
    ):
        run(parse_args(small), DistEnv())


# --------------------------------------------------------------------------- precision
def test_bf16_precisions_resolve_on_cpu_and_fp16_stays_an_error():
    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("amp_bf16", cpu) == "amp_bf16"
    assert resolve_precision("amp_bf16", torch.device("cuda", 0)) == "amp_bf16"
    with pytest.raises(InputError, match="--precision fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(InputError, match="unknown precision 'bf32'"):
        resolve_precision("bf32", cpu)
    assert weight_dtype("bf16") == torch.bfloat16 and weight_dtype("amp_bf16") == torch.float32
    with autocast("amp_bf16", cpu):
        assert (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
    with autocast("bf16", cpu):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("precision", ["bf16", "amp_bf16"])
def test_bf16_training_step_on_cpu(data, precision):
    batch = _batch(data, 4, *ALL_FLAGS)
    args = parse_args(
        ["--train-data", "x.jsonl", "--model", "tiny", "--precision", precision, "--lr", "1e-3"]
    )
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(args, cpu, precision)
    torch.manual_seed(0)
    ref = build_model(parse_args(["--train-data", "x.jsonl", "--model", "tiny"]), cpu, "fp32")
    block = model.visual.transformer.resblocks[0]
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert (
        block.mlp.c_fc.weight.dtype
        == block.attn.in_proj_weight.dtype
        == model.visual.proj.dtype
        == want
    )
    with autocast(precision, cpu):
        assert (
            model.encode_image(batch["image"].to(weight_dtype(precision))).dtype == torch.bfloat16
        )

    cfg = StepConfig(terms=AGREE_TERMS, env=DistEnv(), precision=precision)
    fp32_total, _ = compute_loss(ref, batch, StepConfig(terms=AGREE_TERMS, env=DistEnv()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train_step(model, batch, build_optimizer(model, args), None, cfg)
    assert losses["loss"] == pytest.approx(fp32_total.item(), rel=3e-2)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert (
        "visual.transformer.resblocks.0.mlp.c_fc.weight" in moved
        and "transformer.resblocks.0.attn.in_proj_weight" in moved
    )


# --------------------------------------------------------------------------- locked towers
@pytest.mark.parametrize(
    "make", [lambda: create_model("tiny"), _tiny_resnet], ids=["vit", "resnet"]
)
def test_layer_groups_partition_each_tower(make):
    model = make()
    image = [p for g in model.layer_groups("image") for p in g]
    text = [p for g in model.layer_groups("text") for p in g]
    ids = [id(p) for p in image + text]
    assert len(ids) == len(set(ids))
    assert {id(p) for p in image} == {id(p) for p in model.visual.parameters()}
    assert set(ids) | {id(model.logit_scale)} == {id(p) for p in model.parameters()}
    assert len(model.layer_groups("image")) == 4 + 2  # stem, 4 blocks (4 ResNet stages), head
    assert len(model.layer_groups("text")) == len(model.transformer.resblocks) + 2
    assert model.layer_groups("text")[-1][-1] is model.text_projection
    with pytest.raises(ValueError):
        model.layer_groups("audio")


@pytest.mark.parametrize(
    "make", [lambda: create_model("tiny"), _tiny_resnet], ids=["vit", "resnet"]
)
def test_locked_parameters_do_not_change_and_unlocked_ones_do(data, make):
    batch = _batch(data, 4, "--is-prompt", "--is-vg")
    args = parse_args(
        [
            "--train-data",
            "x.jsonl",
            "--model",
            "tiny",
            "--lr",
            "1e-2",
            "--wd",
            "0.1",
            "--lock-image",
            "--lock-image-unlocked-groups",
            "1",
            "--lock-text",
        ]
    )
    torch.manual_seed(0)
    model = make()
    lock_towers(model, args)
    model.train()
    frozen_image = model.layer_groups("image")[:-1]
    frozen = [p for g in frozen_image for p in g] + [
        p for g in model.layer_groups("text") for p in g
    ]
    trainable = model.layer_groups("image")[-1] + [model.logit_scale]
    assert all(not p.requires_grad for p in frozen) and all(p.requires_grad for p in trainable)
    optimizer = build_optimizer(model, args)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)

    before = {
        n: t.detach().clone()
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
    }
    for _ in range(2):
        train_step(
            model,
            batch,
            optimizer,
            None,
            StepConfig(terms=("prompt", "grounding_mask"), env=DistEnv()),
        )
    after = dict(list(model.named_parameters()) + list(model.named_buffers()))
    names = {id(p): n for n, p in model.named_parameters()}
    for p in frozen:
        assert torch.equal(p, before[names[id(p)]]), names[id(p)]
    for p in trainable:
        assert not torch.equal(p, before[names[id(p)]]), names[id(p)]
    # a locked ResNet tower's BatchNorm layers are in eval mode: their running statistics stay as they were
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bool(bns) == (make is _tiny_resnet)
    for name, m in bns:
        assert not m.training
        assert torch.equal(after[f"{name}.running_mean"], before[f"{name}.running_mean"]), name


def test_lock_flag_errors(data, tmp_path):
    with pytest.raises(InputError, match="--lock-image-unlocked-groups needs --lock-image"):
        parse_args(["--train-data", "x.jsonl", "--lock-image-unlocked-groups", "2"])
    with pytest.raises(InputError, match="--lock-text-unlocked-groups must be >= 0"):
        parse_args(["--train-data", "x.jsonl", "--lock-text", "--lock-text-unlocked-groups", "-1"])
    argv = train_argv(data, tmp_path, "lock", "--lock-text", "--lock-text-unlocked-groups", "6")
    with pytest.raises(
        InputError, match="--lock-text-unlocked-groups 6: the text tower of tiny has 6 layer groups"
    ):
        run(parse_args(argv), DistEnv())


def test_bf16_run_with_locked_text_tower_and_clipping_end_to_end(tmp_path):
    paths = make_dataset(tmp_path / "d", n_images=2, caps_per_image=1, n_val=2)
    argv = train_argv(
        paths,
        tmp_path,
        "bf",
        "--is-mask",
        "--precision",
        "bf16",
        "--lock-text",
        "--grad-clip-norm",
        "1.0",
        batch_size=2,
    )
    res = run(parse_args(argv), DistEnv(), keep_history=True)
    assert len(res.history) == 1 and len(res.val) == 1
    log = (tmp_path / "bf" / "out.log").read_text()
    assert "precision bf16" in log and "--lock-text: 6 of 6 layer groups frozen" in log
    state = torch.load(tmp_path / "bf" / "checkpoints" / "epoch_1.pt", weights_only=True)[
        "state_dict"
    ]
    assert state["visual.proj"].dtype == torch.bfloat16
    torch.manual_seed(0)
    init = create_model("tiny").state_dict()
    assert torch.equal(
        state["transformer.resblocks.0.mlp.c_fc.weight"].float(),
        init["transformer.resblocks.0.mlp.c_fc.weight"].bfloat16().float(),
    )


# --------------------------------------------------------------------------- gradient clipping
def test_grad_clip_norm_bounds_the_gradient_norm(data):
    batch = _batch(data, 4, *ALL_FLAGS)
    torch.manual_seed(0)
    model = create_model("tiny").double()
    total, _ = compute_loss(model, batch, CFG)
    total.backward()
    raw = _grads(model)
    norm = torch.cat([g.flatten() for g in raw.values()]).norm().item()
    assert norm > 0
    for limit in (norm / 4, norm * 10):
        clipped = copy.deepcopy(model)
        opt = torch.optim.SGD(clipped.parameters(), lr=0.0)
        cfg = StepConfig(terms=AGREE_TERMS, env=DistEnv(), grad_clip_norm=limit)
        train_step(clipped, batch, opt, None, cfg)
        got = _grads(clipped)
        got_norm = torch.cat([g.flatten() for g in got.values()]).norm().item()
        factor = min(1.0, limit / norm)
        assert got_norm == pytest.approx(norm * factor, rel=1e-6)
        assert got_norm <= limit * (1 + 1e-6)
        for name, g in raw.items():  # the same direction, scaled
            assert torch.allclose(got[name], g * factor, rtol=1e-6, atol=1e-12), name
    with pytest.raises(InputError, match="--grad-clip-norm must be > 0"):
        parse_args(["--train-data", "x.jsonl", "--grad-clip-norm", "0"])


# --------------------------------------------------------------------------- accumulation over ranks
def test_two_ranks_accumulating_match_one_process_with_the_same_global_batch(tmp_path):
    """2 ranks x 2 micro-batches of 1 == 1 process x batch 4: each rank gathers its cached features."""
    from test_train_dist import _argv, _torchrun_like, _update
    from test_train_dist import _losses as dist_losses

    paths = make_dataset(tmp_path / "d", n_images=4, caps_per_image=1, n_val=2)
    run(parse_args(_argv(paths, tmp_path, "one", batch_size=4)), DistEnv())
    _torchrun_like(
        _argv(paths, tmp_path, "two", "--accum-freq", "2", "--gather-with-grad", batch_size=1)
    )
    two, one = dist_losses(tmp_path / "two" / "out.log"), dist_losses(tmp_path / "one" / "out.log")
    assert sorted(two) == sorted(one) == [1, 2]
    assert len(two[1]) == 7  # total + global + five terms
    for step in (1, 2):  # the same update at step 1, so step 2 matches too
        assert two[step] == pytest.approx(one[step], rel=2e-4, abs=2e-5), step
    u1, u2 = _update(tmp_path / "one"), _update(tmp_path / "two")
    assert ((u2 - u1).norm() / u1.norm()).item() < 2e-3


# --------------------------------------------------------------------------- the memory benchmark's machinery
def test_largest_fitting_batch_search():
    bench = load_script("scripts/bench_memory.py")
    for limit in (1, 7, 8, 9, 37, 100, 1000):
        tried = []

        def fits(n, limit=limit, tried=tried):
            tried.append(n)
            return n <= limit

        assert bench.largest_fitting(fits, 8) == (limit, limit + 1)
        assert len(tried) == len(set(tried)) <= 2 * 11  # each batch measured once, O(log) of them
    assert bench.largest_fitting(lambda n: n <= 37, 8, unit=4) == (36, 40)
    assert bench.largest_fitting(lambda n: n <= 3, 8, unit=4) == (0, 4)
    assert bench.largest_fitting(lambda n: True, 8, limit=100) == (100, None)
    assert bench.largest_fitting(lambda n: n <= 100, 8, unit=3, limit=100) == (99, None)
    lo, hi = bench.largest_fitting(lambda n: n <= 1000, 8, resolution=0.125)
    assert lo <= 1000 < hi and hi - lo <= 0.125 * lo


def test_memory_benchmark_child_measures_a_step_and_reports_errors():
    bench = load_script("scripts/bench_memory.py")
    r = bench.run_child(
        "tiny", 4, ["--accum-freq", "2", "--grad-checkpointing", "--lock-text"], "cpu", 1
    )
    assert r["ok"], r
    assert r["peak"] >= r["rss_before_steps"] > 100e6 and r["precision"] == "fp32" and r["loss"] > 0
    bad = bench.run_child("tiny", 3, ["--accum-freq", "2"], "cpu", 1)
    assert not bad["ok"] and not bad["oom"] and "not a multiple of --accum-freq 2" in bad["error"]
