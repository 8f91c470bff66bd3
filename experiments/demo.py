"""The demo experiment: a synthetic world, a cached pre-trained tiny CLIP, zero-shot re-ranking, fine-tuning
(global-only, AGREE, and in the full preset each ablation) over several training seeds, twin scores.

Stages run in process and call the same library code as the README's scripts (training/main_all.py's
`main`, the eval package's top-k, EGR, TBR and recall). The world (fixed data seed) and the backbone are
cached under `cache/` by a hash of everything they depend on, so later runs skip them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from agree.io import InputError
from agree.layout import Layout
from clip.clip import load_checkpoint_state_dict, model_config
from eval.extraction import load_finetuned, load_zero_shot
from experiments.measure import EvalSplit, Scored, entities_found, score, test_split, val_split
from synth.twins import TWIN_KINDS, TwinFiles, write_twins
from synth.writer import SynthConfig, SynthLayout, generate
from training import main_all
from training.terms import AGREE_TERMS, OPTIONAL, flags_of

REPO = Path(__file__).resolve().parents[1]
# the world is a function of these packages' code (agree holds the layout, the mask fill and the pixel
# arithmetic that dataprep writes with) and of its config
CODE_HASHED = ("synth", "dataprep", "agree")
# Seconds per training example (pre-training at batch 64, fine-tuning at batch 32), per generated image,
# and per scored model (the zero-shot one also runs EGR): measured on 2 idle CPU cores with the default
# model (tiny-rn); only used to print the expected times at the start.
RATES = {
    "pretrain": 0.0045,
    "global": 0.0050,
    "agree": 0.0230,
    "score": 8.0,
    "zero-shot": 13.0,
    "world": 0.0013,
}
RATES_LOCKED_IMAGE = {"global": 0.0041, "agree": 0.0204}  # fine-tuning with --lock-image
AUGMENT = "random-resized-crop"  # main_all.py --augment of pre-training and fine-tuning


@dataclass(frozen=True)
class Recipe:
    """Every setting of the demo (each can be changed from scripts/demo.py's flags or run_demo.sh's environment)."""

    # the world: one fixed data seed; sizes of the splits
    data_seed: int = 0
    train_images: int = 1000
    train_captions: int = 5
    val_images: int = 500
    test_images: int = 1000
    twin_pairs: int = 300  # per twin kind
    vg_per_object: int = 20
    model: str = "tiny-rn"  # a small modified ResNet: it learns shapes where the tiny ViT did not
    # the backbone (pre-training on the simple-caption split)
    pretrain_images: int = 12000
    pretrain_captions: int = 2
    pretrain_epochs: int = 3
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    pretrain_warmup: int = 100
    # fine-tuning
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    wd: float = 0.1
    lock_image: bool = True  # fine-tune the text tower only (main_all.py --lock-image)
    methods: tuple[str, ...] = ("global-only", "AGREE")
    ablation: bool = False

    def world_config(self) -> dict:
        """What the synthetic world depends on."""
        keys = (
            "data_seed",
            "train_images",
            "train_captions",
            "val_images",
            "test_images",
            "twin_pairs",
            "vg_per_object",
            "pretrain_images",
            "pretrain_captions",
        )
        return {k: getattr(self, k) for k in keys} | {
            "resolution": model_config(self.model)["image_resolution"]
        }

    def backbone_config(self) -> dict:
        """What the pre-trained backbone depends on: the pre-training split (its own random stream, so the
        sizes of the other splits do not matter) and the pre-training recipe."""
        keys = (
            "data_seed",
            "pretrain_images",
            "pretrain_captions",
            "pretrain_epochs",
            "pretrain_batch",
            "pretrain_lr",
            "pretrain_warmup",
        )
        return {k: getattr(self, k) for k in keys} | {"model": model_config(self.model)}


PRESETS: dict[str, Recipe] = {
    "default": Recipe(),
    # a first look in minutes: one seed, a smaller world and backbone; no claims
    "quick": Recipe(
        seeds=(0,),
        train_images=500,
        val_images=200,
        twin_pairs=100,
        pretrain_images=6000,
        pretrain_epochs=1,
        epochs=1,
    ),
    "full": Recipe(ablation=True),
}


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def code_digest(packages: tuple[str, ...] = CODE_HASHED) -> str:
    """Hash of the source files of the given packages (a change to the generator invalidates the cache)."""
    h = hashlib.sha256()
    for pkg in packages:
        for path in sorted((REPO / pkg).glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def methods(recipe: Recipe) -> list[tuple[str, tuple[str, ...]]]:
    """Fine-tuned methods (row label, enabled AGREE terms): global-only, AGREE, then each ablation."""
    unknown = set(recipe.methods) - {"global-only", "AGREE"}
    if unknown:
        raise InputError(
            f"--methods: unknown method(s) {', '.join(sorted(unknown))} (global-only, AGREE)"
        )
    out = [
        (label, terms)
        for label, terms in (("global-only", ()), ("AGREE", AGREE_TERMS))
        if label in recipe.methods
    ]
    if recipe.ablation:
        out += [
            (f"AGREE w/o {t.label}", tuple(n for n in AGREE_TERMS if n != t.name)) for t in OPTIONAL
        ]
    return out


@dataclass
class Stage:
    """Progress lines: one per stage, with the expected and the measured time."""

    total_expected: float
    seconds: dict = field(default_factory=dict)
    start: float = field(default_factory=time.time)
    count: int = 0

    def run(self, name: str, expected: float, fn: Callable[[], object]) -> object:
        """Run one stage, print its line before and after, keep its time."""
        self.count += 1
        elapsed = time.time() - self.start
        print(
            f"[{time.strftime('%H:%M:%S')}] {name} (expected ~{expected:.0f} s; {elapsed:.0f} s elapsed of "
            f"~{self.total_expected:.0f} s)",
            flush=True,
        )
        t0 = time.time()
        out = fn()
        self.seconds[name] = round(time.time() - t0, 1)
        print(f"    done in {self.seconds[name]:.0f} s", flush=True)
        return out


def expected_seconds(recipe: Recipe, world_cached: bool, backbone_cached: bool) -> dict[str, float]:
    """Expected seconds of each kind of stage and in total, from RATES."""
    examples = recipe.train_images * recipe.train_captions * recipe.epochs
    pretrain = recipe.pretrain_images * recipe.pretrain_captions * recipe.pretrain_epochs
    images = (
        recipe.train_images
        + recipe.val_images
        + recipe.test_images
        + recipe.pretrain_images
        + 2 * len(TWIN_KINDS) * recipe.twin_pairs
    )
    out = {
        "world": 0.0 if world_cached else RATES["world"] * images,
        "backbone": 0.0 if backbone_cached else RATES["pretrain"] * pretrain,
        "score": RATES["score"],
        "zero-shot": RATES["zero-shot"],
    }
    rates = RATES_LOCKED_IMAGE if recipe.lock_image else RATES
    out |= {"global": rates["global"] * examples, "agree": rates["agree"] * examples}
    runs = [out["global"] if not terms else out["agree"] for _, terms in methods(recipe)] * len(
        recipe.seeds
    )
    out["total"] = (
        out["world"] + out["backbone"] + out["zero-shot"] + sum(runs) + len(runs) * out["score"]
    )
    return out


# ---------------------------------------------------------------- cached world and backbone


def world_dir(cache: Path, recipe: Recipe) -> Path:
    """Where the world of this recipe lives in the cache."""
    return (
        cache / "worlds" / f"{recipe.data_seed}-{_digest([recipe.world_config(), code_digest()])}"
    )


def _world_ready(folder: Path) -> bool:
    """A complete cached world: the generator's world.json (written last) and the twin pairs (written after it)."""
    return SynthLayout.under(folder).world.is_file() and TwinFiles(folder / "twins").pairs.is_file()


def build_world(cache: Path, recipe: Recipe) -> Path:
    """Generate the world (release layout + pre-training split + twin split) unless cached; its folder."""
    target = world_dir(cache, recipe)
    if _world_ready(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        c = recipe.world_config()
        generate(
            SynthConfig(
                out=tmp,
                seed=c["data_seed"],
                train_images=c["train_images"],
                val_images=c["val_images"],
                test_images=c["test_images"],
                pretrain_images=c["pretrain_images"],
                resolution=c["resolution"],
                train_captions=c["train_captions"],
                pretrain_captions=c["pretrain_captions"],
                vg_per_object=c["vg_per_object"],
            ),
            progress=False,
        )
        write_twins(tmp / "twins", c["data_seed"], c["twin_pairs"], c["resolution"])
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def backbone_path(cache: Path, recipe: Recipe) -> Path:
    """Where the backbone of this recipe lives in the cache."""
    key = _digest([code_digest(), recipe.backbone_config()])
    return cache / "backbones" / f"{recipe.model}-{key}.pt"


def _train(argv: list[str]) -> None:
    """training/main_all.py in this process (one CPU worker)."""
    main_all.main(
        argv
        + [
            "--nproc=1",
            "--device=cpu",
            "--workers=0",
            "--log-every-n-steps=200",
            f"--augment={AUGMENT}",
        ]
    )


def pretrain_backbone(cache: Path, recipe: Recipe, world: Path) -> Path:
    """Pre-train the tiny CLIP on the world's simple-caption split (global term only) unless cached."""
    target = backbone_path(cache, recipe)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lay = SynthLayout.under(world)
    with tempfile.TemporaryDirectory(prefix=".pretraining-", dir=target.parent) as tmp:
        _train(
            [
                f"--train-data={lay.pretrain_jsonl}",
                f"--train-images={lay.pretrain_npz}",
                f"--data-root={lay.data_dir}",
                "--model",
                recipe.model,
                f"--seed={recipe.data_seed}",
                f"--epochs={recipe.pretrain_epochs}",
                f"--batch-size={recipe.pretrain_batch}",
                f"--lr={recipe.pretrain_lr}",
                "--wd=0.1",
                f"--warmup={recipe.pretrain_warmup}",
                f"--save-frequency={recipe.pretrain_epochs}",
                f"--logs={tmp}",
                "--name=pretrain",
            ]
        )
        weights = load_checkpoint_state_dict(
            Path(tmp) / "pretrain" / "checkpoints" / f"epoch_{recipe.pretrain_epochs}.pt"
        )
        torch.save(weights, Path(tmp) / "backbone.pt")
        (Path(tmp) / "backbone.pt").rename(target)
    return target


# ---------------------------------------------------------------- fine-tuning and scoring


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")


def fine_tune(
    out: Path,
    recipe: Recipe,
    world: Path,
    backbone: Path,
    label: str,
    terms: tuple[str, ...],
    seed: int,
) -> Path:
    """Fine-tune the backbone with the named terms and a training seed; the checkpoint's path."""
    lay = Layout.under(world)
    name = f"{_slug(label)}-seed{seed}"
    _train(
        [
            f"--train-data={lay.train_jsonl}",
            f"--data-root={lay.data_dir}",
            f"--vg-root={lay.vg_dir}",
            "--dataset-type=json",
            *flags_of(terms),
            "--model",
            recipe.model,
            "--openai-pretrained",
            f"--pretrained-path={backbone}",
            f"--seed={seed}",
            f"--epochs={recipe.epochs}",
            f"--batch-size={recipe.batch_size}",
            f"--lr={recipe.lr}",
            f"--wd={recipe.wd}",
            f"--warmup={recipe.warmup}",
            f"--save-frequency={recipe.epochs}",
            f"--logs={out / 'runs'}",
            f"--name={name}",
        ]
        + (["--lock-image"] if recipe.lock_image else [])
    )
    return out / "runs" / name / "checkpoints" / f"epoch_{recipe.epochs}.pt"


@dataclass
class Measured:
    """Everything scored in one demo run, before it is summarised into rows."""

    split: str
    zero_shot: Scored
    fine_tuned: dict = field(default_factory=dict)  # (label, seed) -> Scored
    entities_found: Optional[dict] = (
        None  # backbone: percent of T2I top-1 holding the named entities / shapes
    )


def run(
    recipe: Recipe, out: Path, cache: Path, eval_split: str = "test"
) -> tuple[Measured, dict, EvalSplit]:
    """Every stage; returns the measurements, the stage times and the evaluation split."""
    if eval_split not in ("test", "val"):
        raise InputError(f"--eval-split must be test or val, got {eval_split!r}")
    expected = expected_seconds(
        recipe, _world_ready(world_dir(cache, recipe)), backbone_path(cache, recipe).is_file()
    )
    stages = Stage(expected["total"])
    n_runs = len(recipe.seeds) * len(methods(recipe))
    print(
        f"demo: {len(recipe.seeds)} training seed(s) x {len(methods(recipe))} fine-tuned method(s) = {n_runs} "
        f"fine-tuning runs, scored on {eval_split}; expected total ~{expected['total'] / 60:.1f} min",
        flush=True,
    )
    world = stages.run("world", expected["world"], lambda: build_world(cache, recipe))
    backbone = stages.run(
        "backbone", expected["backbone"], lambda: pretrain_backbone(cache, recipe, world)
    )
    lay = Layout.under(world)
    split = test_split(lay) if eval_split == "test" else val_split(lay)
    twins = TwinFiles(world / "twins") if eval_split == "test" else None

    def zero_shot() -> Scored:
        model = load_zero_shot(backbone, recipe.model, torch.device("cpu"), "fp32")
        return score(model, split, twins, egr=eval_split == "test")

    measured = Measured(eval_split, stages.run("zero-shot", expected["zero-shot"], zero_shot))
    found = entities_found(
        SynthLayout.under(world).meta[eval_split], split, measured.zero_shot.top1["plain"]
    )
    measured.entities_found = found
    print(
        f"    backbone: {found['entities']:.1f}% of zero-shot T2I top-1 images contain every entity the query names "
        f"({found['entities_chance']:.1f}% at random), {found['shapes']:.1f}% every shape "
        f"({found['shapes_chance']:.1f}% at random)",
        flush=True,
    )
    for seed in recipe.seeds:
        for label, terms in methods(recipe):
            kind = "global" if not terms else "agree"

            def one(label: str = label, terms: tuple = terms, seed: int = seed) -> Scored:
                ckpt = fine_tune(out, recipe, world, backbone, label, terms, seed)
                model = load_finetuned(ckpt, recipe.model, torch.device("cpu"), "fp32")
                result = score(model, split, twins, tbr=label == "AGREE")
                ckpt.unlink()  # tens of MB per run; the run's log stays
                return result

            measured.fine_tuned[(label, seed)] = stages.run(
                f"{label} seed {seed}", expected[kind] + RATES["score"], one
            )
    return measured, stages.seconds, split


def recipe_dict(recipe: Recipe) -> dict:
    """The recipe as JSON-ready values."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(recipe).items()}


def with_overrides(recipe: Recipe, **changes: object) -> Recipe:
    """The recipe with the given (non-None) settings changed."""
    return replace(recipe, **{k: v for k, v in changes.items() if v is not None})
