"""Table reproduction: runs the README's recipes stage by stage and collects the recall tables.

Every stage is one call of a README script (`experiments.stages`: recorded in a manifest, skipped when
done, resumed when killed). The zero-shot and fine-tuned rows are the re-ranking chains of
`eval.rerankers`; each row's recalls come from `eval/evaluation.py`'s output (arithmetic:
`agree.metrics`), its test-sampling error from bootstrapping the test images over each query's rank of
the first correct item; published numbers for the same setting (`experiments.references`) stand beside
it. results.md and results.json are rewritten after every row.
"""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from agree.io import InputError, atomic_write, read_json, write_json
from agree.layout import Layout
from agree.metrics import ROW_KEYS, as_rank_array, retrieval_row, row_from_ranks
from agree.ownership import OutputFolder
from eval.metrics import first_gold_ranks
from eval.predictions import RankedLists, read_ranked_lists
from eval.rerankers import (
    FINE_TUNED_CHAINS,
    ZERO_SHOT_CHAINS,
    Reranker,
    missing_features,
    parse_chain,
)
from eval.rerankers import label as chain_label
from experiments.references import difference, references_for
from experiments.report import method_label
from experiments.stages import Stage, StageRunner
from experiments.stats import bootstrap_rsum_se, paired_bootstrap_rsum
from training.data import required_files, resolve_paths
from training.distributed import plan_launch
from training.params import parse_args as train_args
from training.terms import AGREE_TERMS, OPTIONAL, enabled_terms, flags_of

REPO = Path(__file__).resolve().parents[1]
OWNER = "scripts/reproduce_tables.py"
RECIPE_EPOCH = 2  # the README recipe evaluates checkpoints/epoch_2.pt
RELEASE_GLOBAL_BATCH = 32  # the release's fine-tuning script: 4 GPUs x --batch-size 8
SECTIONS = {
    "zeroshot": "Zero-shot re-ranking",
    "finetune": "Fine-tuning",
    "ablation": "Ablation (fine-tuned, no re-ranking)",
}
FINE_TUNED = (("global-only", ()), ("AGREE", AGREE_TERMS))  # the fine-tuning table's models
RANKING = {
    "release": "the release's arithmetic (--legacy-detached-rank: the ranking terms' hinge sums "
    "detached, only the logit scale gets their gradient)",
    "described": "as the paper describes them (gradients through all six terms)",
}
# How the table runner calls each re-ranker's README script, keyed by the registry's script.
FIRST_STAGE_SUFFIX = {"eval/make_topk_predictions_mask+prompt.py": "_mask+prompt"}
LIST_RERANKER_SUFFIX = {"eval/eval_back_retrieval.py": "_rerank"}


def ablation_configs() -> list[tuple[str, tuple[str, ...]]]:
    """AGREE minus each term in turn: (row label, names of the enabled terms)."""
    return [
        (f"AGREE w/o {t.label}", tuple(n for n in AGREE_TERMS if n != t.name)) for t in OPTIONAL
    ]


def evaluated_epoch(epochs: int, requested: Optional[int]) -> int:
    """The fine-tuned epoch to evaluate: `requested`, else the recipe's when `epochs` reaches it, else the last."""
    if requested is None:
        return RECIPE_EPOCH if epochs >= RECIPE_EPOCH else epochs
    if not 1 <= requested <= epochs:
        raise InputError(f"--epoch must be between 1 and --epochs ({epochs}), got {requested}")
    return requested


def batch_split(global_batch: int, processes: int, max_batch: int) -> tuple[int, int]:
    """(per-process batch, --accum-freq) whose product times `processes` is `global_batch`: the largest
    per-process batch up to `max_batch` that divides the process's share, the rest as accumulation."""
    if global_batch < 1 or max_batch < 1:
        raise InputError(
            f"--global-batch and --batch-size must be >= 1, got {global_batch}, {max_batch}"
        )
    if global_batch % processes:
        raise InputError(
            f"--global-batch {global_batch} cannot be reached with {processes} fine-tuning processes "
            f"({global_batch} is not a multiple of {processes}); choose --nproc N with N dividing "
            f"{global_batch}, or another --global-batch"
        )
    share = global_batch // processes
    batch = max(d for d in range(1, min(share, max_batch) + 1) if share % d == 0)
    return batch, share // batch


@dataclass(frozen=True)
class FineTuneLayout:
    """How every fine-tuning run reaches the global batch."""

    processes: int  # worker processes of main_all.py (its --nproc, or its default)
    batch_size: int  # per process and micro-batch
    accum_freq: int  # micro-batches per optimiser step

    @property
    def global_batch(self) -> int:
        """Examples per optimiser step."""
        return self.processes * self.batch_size * self.accum_freq

    def describe(self) -> str:
        """E.g. "4 processes x batch 8" or "1 process x batch 8 x 4 accumulated micro-batches"."""
        text = f"{self.processes} process{'es' if self.processes > 1 else ''} x batch {self.batch_size}"
        if self.accum_freq > 1:
            text += f" x {self.accum_freq} accumulated micro-batches"
        return text


def fine_tune_layout(args: argparse.Namespace) -> FineTuneLayout:
    """The process count main_all.py will use (its own rule: --nproc, else one per visible GPU on CUDA,
    else 1) and the split of --global-batch over it."""
    processes = plan_launch(args.nproc, args.device, None, None).world_size
    batch, accum = batch_split(args.global_batch, processes, args.batch_size)
    return FineTuneLayout(processes, batch, accum)


def fine_tune_flags(args: argparse.Namespace) -> list[str]:
    """main_all.py flags that the table runner passes to every fine-tuning run."""
    lay = args.layout
    flags = [
        f"--save-frequency={args.epoch}",
        f"--stop-after-epoch={args.epoch}",
        f"--batch-size={lay.batch_size}",
        f"--accum-freq={lay.accum_freq}",
    ]
    if args.nproc is not None:
        flags.append(f"--nproc={args.nproc}")
    if args.ranking == "release":
        flags.append("--legacy-detached-rank")
    if args.save_every_n_steps:
        flags.append(f"--save-every-n-steps={args.save_every_n_steps}")
    if args.max_missing_fraction is not None:
        flags.append(f"--max-missing-fraction={args.max_missing_fraction}")
    if args.precision:
        flags.append(f"--precision={args.precision}")
    if args.jit:
        flags.append("--jit")
    flags.append("--resume=latest")  # a new run, or the continuation of a killed one
    return flags


def open_output_folder(out: str | Path, overwrite: bool) -> OutputFolder:
    """--out as the runner's output folder: continued, or with `overwrite` emptied of what earlier runs
    wrote (files it did not write are never deleted; a folder of someone else's files is refused)."""
    folder = OutputFolder(out, OWNER)
    out = Path(out)
    if out.exists() and not folder.marker.is_file() and any(out.iterdir()):
        raise InputError(
            f"--out {out} holds files that {OWNER} did not write; choose a new or empty folder"
        )
    if overwrite and folder.marker.is_file():
        removed = folder.remove_owned()
        print(f"--overwrite: deleted {len(removed)} path(s) written by earlier runs under {out}")
        left = folder.foreign()
        if left:
            shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            print(f"  kept {len(left)} file(s) that it did not write: {shown}")
    return folder


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_").replace("__", "_")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Model:
    """Whose features a chain ranks: row label, prediction folder, feature files by set name."""

    label: str
    folder: Path
    feats: dict[str, Path]  # "image", "text", and extra sets ("prompt", "mask")


class TableRunner:
    """Runs each experiment through the README's scripts and keeps its recall row."""

    def __init__(self, args: argparse.Namespace, folder: Optional[OutputFolder] = None):
        self.args = args
        self.lay = Layout.from_data_dir(args.data_root, args.dataset, args.vg_root)
        self.out = Path(args.out)
        self.folder = folder or OutputFolder(self.out, OWNER)
        self.stages = StageRunner(self.folder, REPO)
        self.planning = False
        self.rows: list[dict] = []
        self.rank_arrays: dict[
            str, tuple[np.ndarray, np.ndarray]
        ] = {}  # method -> first-gold ranks
        self.paired: list[dict] = []
        self.files: dict[str, Path] = {}
        self._gt: Optional[tuple[RankedLists, RankedLists, list[int], int]] = None
        for path in self.lay.test_files():
            if not path.is_file():
                raise InputError(f"--data-root: {path} not found")
        if not Path(args.pretrained).is_file():
            raise InputError(f"--pretrained: checkpoint not found: {args.pretrained}")

    # ------------------------------------------------------------------ the plan
    def run_parts(self, parts: Sequence[str]) -> None:
        """Plan every stage of the selected parts (for the ETA), then run them in order."""
        self._ground_truth()  # the test split's shape is checked before anything runs
        self.planning = True
        self._parts(parts)
        self.planning = False
        print(
            f"{self.stages.total} stages under {self.out}, {len(self.stages.remaining)} to run "
            "(the others finished in an earlier run)",
            flush=True,
        )
        self._parts(parts)

    def _parts(self, parts: Sequence[str]) -> None:
        if "zeroshot" in parts:
            self.zero_shot()
        if "finetune" in parts:
            for label, terms in FINE_TUNED:
                self.fine_tuned(label, terms, FINE_TUNED_CHAINS, SECTIONS["finetune"])
        if "ablation" in parts:
            for label, terms in ablation_configs():
                self.fine_tuned(label, terms, ("",), SECTIONS["ablation"])

    def run(self, stage: Stage) -> None:
        """Run one stage (while planning: count it)."""
        if self.planning:
            self.stages.plan(stage)
        else:
            self.stages.run(stage)

    # ------------------------------------------------------------------ plumbing
    def _device_flags(self) -> list[str]:
        return ["--device", self.args.device] if self.args.device else []

    def _jit_flags(self) -> list[str]:
        return ["--jit"] if self.args.jit else []

    def _ground_truth(self) -> tuple[RankedLists, RankedLists, list[int], int]:
        """Both directions' ground truth, the caption rows image by image, captions per image."""
        if self._gt is None:
            t2i = read_ranked_lists(self.lay.test_texts, "query_id", "ground truth")
            i2t = read_ranked_lists(self.lay.test_images, "image_id", "ground truth")
            per = {len(caps) for caps in i2t.items}
            if len(per) != 1 or 0 in per:
                raise InputError(
                    f"{self.lay.test_images}: images have {sorted(per)} captions; the sampling error "
                    "needs the same number for every test image"
                )
            order = []
            for image, caps, line in zip(i2t.ids, i2t.items, i2t.lines):
                for q in caps:
                    if str(q) not in t2i.index:
                        raise InputError(
                            f"{self.lay.test_images}:{line}: caption {q!r} of image {image!r} is not a "
                            f"query of {self.lay.test_texts}"
                        )
                    order.append(t2i.index[str(q)])
            self._gt = (t2i, i2t, order, per.pop())
        return self._gt

    def first_gold(self, texts_pred: Path, images_pred: Path) -> tuple[np.ndarray, np.ndarray]:
        """First-gold ranks (None -> agree.metrics.ABSENT) of the captions, image by image, and of the images."""
        t2i_gt, i2t_gt, order, _ = self._ground_truth()
        t2i = as_rank_array(first_gold_ranks(t2i_gt, read_ranked_lists(texts_pred, "query_id")))
        i2t = as_rank_array(first_gold_ranks(i2t_gt, read_ranked_lists(images_pred, "image_id")))
        return t2i[order], i2t

    def evaluate(self, name: str, texts_pred: Path, images_pred: Path) -> Optional[dict]:
        """The row of a pair of prediction files, through evaluation.py both ways (None while planning)."""
        scores = {}
        for direction, gt, pred, key in (
            ("t2i", self.lay.test_texts, texts_pred, "query_id"),
            ("i2t", self.lay.test_images, images_pred, "image_id"),
        ):
            out = pred.with_name(f"score_{pred.stem}.json")
            self.run(
                Stage(
                    f"{name}.eval_{direction}",
                    "evaluate",
                    "eval/evaluation.py",
                    [str(gt), str(pred), str(out), key],
                    inputs=[gt, pred],
                    outputs=[out],
                )
            )
            if not self.planning:
                scores[direction] = read_json(out)["scoreJson"]
        if self.planning:
            return None
        return retrieval_row(scores["t2i"], scores["i2t"])

    # ------------------------------------------------------------------ re-ranking chains
    def _topk(self, model: Model, name: str) -> tuple[Path, Path]:
        """make_topk_predictions.py -> (images predictions, texts predictions)."""
        images = model.folder / "test_images_predictions.jsonl"
        texts = model.folder / "test_texts_predictions.jsonl"
        feats = [model.feats["image"], model.feats["text"]]
        self.run(
            Stage(
                name,
                "rank",
                "eval/make_topk_predictions.py",
                [
                    f"--image-feats={feats[0]}",
                    f"--text-feats={feats[1]}",
                    f"--top-k={self.args.top_k}",
                    f"--eval-batch-size={self.args.eval_batch_size}",
                    f"--output-images={images}",
                    f"--output-texts={texts}",
                    *self._device_flags(),
                ],
                inputs=feats,
                outputs=[images, texts],
            )
        )
        return images, texts

    def _first_stage(self, model: Model, r: Reranker, name: str) -> tuple[Path, Path]:
        """A first-stage re-ranker's script (EGR: make_topk_predictions_mask+prompt.py)."""
        if r.script not in FIRST_STAGE_SUFFIX:
            raise ValueError(f"the table runner does not know how to call {r.script} ({r.name})")
        suffix = FIRST_STAGE_SUFFIX[r.script]
        images = model.folder / f"test_images_predictions{suffix}.jsonl"
        texts = model.folder / f"test_texts_predictions{suffix}.jsonl"
        feats = [model.feats["image"], model.feats["text"]] + [model.feats[n] for n in r.needs]
        self.run(
            Stage(
                name,
                "rank",
                r.script,
                [
                    f"--image-feats={model.feats['image']}",
                    f"--text-feats={model.feats['text']}",
                    *(f"--{n}-feats={model.feats[n]}" for n in r.needs),
                    f"--top-k={self.args.egr_top_k}",
                    f"--eval-batch-size={self.args.eval_batch_size}",
                    f"--output-images={images}",
                    f"--output-texts={texts}",
                    *self._device_flags(),
                ],
                inputs=feats,
                outputs=[images, texts],
            )
        )
        return images, texts

    def _list_reranker(self, r: Reranker, lists: tuple[Path, Path], name: str) -> tuple[Path, Path]:
        """A list re-ranker's script (TBR: eval_back_retrieval.py, the README's positional arguments)."""
        if r.script not in LIST_RERANKER_SUFFIX:
            raise ValueError(f"the table runner does not know how to call {r.script} ({r.name})")
        suffix = LIST_RERANKER_SUFFIX[r.script]
        images_pred, texts_pred = lists
        images_out = images_pred.with_name(images_pred.stem + suffix + ".jsonl")
        texts_out = texts_pred.with_name(texts_pred.stem + suffix + ".jsonl")
        inputs = [self.lay.test_images, images_pred, self.lay.test_texts, texts_pred]
        self.run(
            Stage(
                name,
                "rerank",
                r.script,
                [str(p) for p in (*inputs, images_out, texts_out)],
                inputs=inputs,
                outputs=[images_out, texts_out],
            )
        )
        return images_out, texts_out

    def chains(self, model: Model, prefix: str, specs: Sequence[str], section: str) -> None:
        """Rank with each chain of `specs` (shared prefixes run once), evaluate, keep one row per chain."""
        missing = missing_features(specs, model.feats)
        if missing:
            raise ValueError(f"{model.label}: {missing}")
        done: dict[tuple[str, ...], tuple[Path, Path]] = {}

        def lists_of(chain: tuple[Reranker, ...]) -> tuple[Path, Path]:
            key = tuple(r.name for r in chain)
            if key not in done:
                name = f"{prefix}.{_slug('+'.join(key)) or 'plain'}"
                if not chain:
                    done[key] = self._topk(model, name)
                elif chain[-1].first_stage:
                    done[key] = self._first_stage(model, chain[-1], name)
                else:
                    done[key] = self._list_reranker(chain[-1], lists_of(chain[:-1]), name)
            return done[key]

        for spec in specs:
            chain = parse_chain(spec)
            images, texts = lists_of(chain)
            name = f"{prefix}.{_slug(chain_label(spec))}"
            row = self.evaluate(name, texts, images)
            if row is not None:
                self.add_row(section, method_label(model.label, spec), row, texts, images)
                self.files[f"{prefix}:{chain_label(spec)}"] = texts

    # ------------------------------------------------------------------ experiments
    def zero_shot(self) -> None:
        """Pre-trained model: the zero-shot chains (plain, TBR, EGR, EGR+TBR)."""
        a = self.args
        folder = self.out / "predictions" / "zeroshot"
        feats = {
            k: folder / f"{self.lay.dataset}_test_{n}"
            for k, n in (
                ("image", "imgs.224.img_feat.jsonl"),
                ("text", "queries.txt_feat.jsonl"),
                ("mask", "queries.mask_feat.jsonl"),
                ("prompt", "queries.prompt_feat.jsonl"),
            )
        }
        self.run(
            Stage(
                "zeroshot.extract",
                "extract zero-shot",
                "eval/extract_features_zs_mask+prompt.py",
                [
                    "--extract-image-feats",
                    "--extract-text-feats",
                    "--extract-mask-feats",
                    "--extract-prompt-feats",
                    f"--image-data={self.lay.test_npz}",
                    f"--text-data={self.lay.test_texts}",
                    f"--prompt-data={self.lay.test_segs}",
                    f"--img-batch-size={a.eval_batch_size}",
                    f"--text-batch-size={a.eval_batch_size}",
                    f"--resume={a.pretrained}",
                    f"--image-feat-output-path={feats['image']}",
                    f"--text-feat-output-path={feats['text']}",
                    f"--mask-feat-output-path={feats['mask']}",
                    f"--prompt-feat-output-path={feats['prompt']}",
                    "--model",
                    a.model,
                    *self._jit_flags(),
                    *self._device_flags(),
                ],
                inputs=[
                    self.lay.test_npz,
                    self.lay.test_texts,
                    self.lay.test_segs,
                    Path(a.pretrained),
                ],
                outputs=list(feats.values()),
            )
        )
        self.chains(
            Model("CLIP", folder, feats), "zeroshot", ZERO_SHOT_CHAINS, SECTIONS["zeroshot"]
        )

    def train_stage(self, slug: str, terms: Sequence[str]) -> tuple[Stage, Path]:
        """The fine-tuning stage of one model and the checkpoint it leaves."""
        a = self.args
        runs = self.out / "runs"
        flags = [
            f"--train-data={self.lay.train_jsonl}",
            f"--val-data={self.lay.val_json}",
            "--img-key",
            "image",
            "--caption-key",
            "caption",
            "--dataset-type",
            "json",
            *flags_of(terms),
            f"--dist-url=tcp://127.0.0.1:{_free_port()}",
            f"--warmup={a.warmup}",
            f"--lr={a.lr}",
            f"--wd={a.wd}",
            f"--epochs={a.epochs}",
            f"--workers={a.workers}",
            "--model",
            a.model,
            "--openai-pretrained",
            f"--pretrained-path={a.pretrained}",
            f"--data-root={self.lay.data_dir}",
            f"--vg-root={self.lay.vg_dir}",
            f"--dataset={self.lay.dataset}",
            f"--logs={runs}",
            f"--name={slug}",
            f"--seed={a.seed}",
            *self._device_flags(),
            *fine_tune_flags(a),
        ]
        targs = train_args(flags)
        reads = [p for _, _, p in required_files(enabled_terms(targs), resolve_paths(targs))]
        checkpoints = runs / slug / "checkpoints"
        checkpoint = checkpoints / f"epoch_{a.epoch}.pt"
        stage = Stage(
            f"{slug}.train",
            "fine-tune",
            "training/main_all.py",
            flags,
            inputs=[*dict.fromkeys(reads), Path(a.pretrained)],
            outputs=[checkpoint],
            folders=[runs / slug],
            volatile=("--dist-url=",),
            resumable=True,
            discard=[checkpoints / "epoch_latest.pt"],  # only resuming needed it
        )
        return stage, checkpoint

    def fine_tuned(
        self, label: str, terms: Sequence[str], specs: Sequence[str], section: str
    ) -> None:
        """Fine-tune from the pre-trained checkpoint with the named `terms`; rank with `specs`; keep rows."""
        a = self.args
        slug = _slug(label)
        stage, checkpoint = self.train_stage(slug, terms)
        self.run(stage)
        folder = self.out / "predictions" / slug
        feats = {
            "image": folder / f"{self.lay.dataset}_test_images.img_feat.jsonl",
            "text": folder / f"{self.lay.dataset}_test_texts.txt_feat.jsonl",
        }
        self.run(
            Stage(
                f"{slug}.extract",
                "extract",
                "eval/extract_features.py",
                [
                    "--extract-image-feats",
                    "--extract-text-feats",
                    f"--image-data={self.lay.test_npz}",
                    f"--text-data={self.lay.test_texts}",
                    f"--img-batch-size={a.eval_batch_size}",
                    f"--text-batch-size={a.eval_batch_size}",
                    f"--resume={checkpoint}",
                    f"--image-feat-output-path={feats['image']}",
                    f"--text-feat-output-path={feats['text']}",
                    "--model",
                    a.model,
                    *self._device_flags(),
                ],
                inputs=[self.lay.test_npz, self.lay.test_texts, checkpoint],
                outputs=list(feats.values()),
            )
        )
        self.chains(Model(label, folder, feats), slug, specs, section)

    # ------------------------------------------------------------------ rows
    def add_row(
        self, section: str, method: str, row: dict, texts_pred: Path, images_pred: Path
    ) -> None:
        """Keep one row (recalls, test-sampling error, published numbers), then rewrite the results."""
        t2i, i2t = self.first_gold(texts_pred, images_pred)
        check = row_from_ranks(t2i, i2t)
        if any(abs(check[k] - row[k]) > 1e-6 for k in ROW_KEYS):
            raise InputError(
                f"{method}: evaluation.py's recalls {row} differ from the ranks in {texts_pred}, {images_pred}"
            )
        caps = self._ground_truth()[3]
        record = {
            "section": section,
            "method": method,
            **{k: round(row[k], 2) for k in ROW_KEYS},
            "test_se": {"rsum": round(bootstrap_rsum_se(t2i, i2t, caps), 2)},
        }
        refs = references_for(self.lay.dataset, self.args.model, method)
        if refs:
            record["references"] = [
                {
                    "source": r.source,
                    "url": r.url,
                    "note": r.note,
                    "values": dict(r.values),
                    "difference": difference(row, r),
                }
                for r in refs
            ]
        self.rows.append(record)
        self.rank_arrays[method] = (t2i, i2t)
        self._pair(method, caps)
        print(
            f"    {method}: T→I R@1 {row['t2i_r1']:.2f}  I→T R@1 {row['i2t_r1']:.2f}  "
            f"RSUM {row['rsum']:.2f} ± {record['test_se']['rsum']:.2f}",
            flush=True,
        )
        self.write_results()

    def _pair(self, method: str, caps: int) -> None:
        """AGREE vs global-only on the same test-image resamples, once both rows of a chain exist."""
        for variant in ("", "TBR"):
            a, b = method_label("AGREE", variant), method_label("global-only", variant)
            if method in (a, b) and a in self.rank_arrays and b in self.rank_arrays:
                stats = paired_bootstrap_rsum(self.rank_arrays[a], self.rank_arrays[b], caps)
                self.paired.append({"a": a, "b": b, "rsum": stats})

    def markdown(self) -> str:
        """The tables, laid out like the paper's (R@1/5/10 each way, RSUM ± its test-sampling error)."""
        lines = []
        for section in dict.fromkeys(r["section"] for r in self.rows):
            lines += [
                f"### {section}",
                "",
                "| Method | T→I R@1 | R@5 | R@10 | I→T R@1 | R@5 | R@10 | RSUM | test SE |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in (r for r in self.rows if r["section"] == section):
                cells = " | ".join(f"{r[k]:.2f}" for k in ROW_KEYS)
                lines.append(f"| {r['method']} | {cells} | {r['test_se']['rsum']:.2f} |")
                for ref in r.get("references", []):
                    pub = " | ".join(
                        f"{ref['values'][k]:.2f}" if k in ref["values"] else "" for k in ROW_KEYS
                    )
                    diff = " | ".join(
                        f"{ref['difference'][k]:+.2f}" if k in ref["difference"] else ""
                        for k in ROW_KEYS
                    )
                    lines.append(f"| ↳ published: [{ref['source']}]({ref['url']}) | {pub} | |")
                    lines.append(f"| ↳ this run − published | {diff} | |")
            lines.append("")
        for p in self.paired:
            s = p["rsum"]
            lines.append(
                f"{p['a']} − {p['b']}: {s['diff']:+.2f} RSUM, {100 * s['level']:.0f}% interval "
                f"[{s['low']:+.2f}, {s['high']:+.2f}] (paired bootstrap over the test images, "
                f"{s['draws']} resamples; one training seed each, so the seed's spread is not in it)."
            )
        notes = {(ref["source"], ref["note"]) for r in self.rows for ref in r.get("references", [])}
        if notes:
            lines += [
                "",
                "Published numbers: " + "; ".join(f"{s}: {n}" for s, n in sorted(notes)) + ".",
            ]
        return "\n".join(lines) + "\n"

    def setup(self) -> dict:
        """The settings every row was produced with."""
        a = self.args
        lay = a.layout
        return {
            "dataset": a.dataset,
            "data_root": str(a.data_root),
            "pretrained": str(a.pretrained),
            "model": a.model,
            "device": a.device or "auto",
            "epochs": a.epochs,
            "epoch": a.epoch,
            "ranking": a.ranking,
            "global_batch": lay.global_batch,
            "processes": lay.processes,
            "batch_size": lay.batch_size,
            "accum_freq": lay.accum_freq,
            "lr": a.lr,
            "wd": a.wd,
            "warmup": a.warmup,
            "seed": a.seed,
        }

    def write_results(self) -> None:
        """results.md and results.json under --out (rewritten after every row)."""
        a = self.args
        paths = [self.out / "results.md", self.out / "results.json"]
        self.stages.claim([p for p in paths if not self.folder.owns(p.name)])
        header = (
            "# AGREE tables\n\n"
            f"Model `{a.model}` from `{a.pretrained}`, data `{a.data_root}` (test split). Fine-tuned "
            f"models: checkpoint `epoch_{a.epoch}.pt` (epoch {a.epoch} of a {a.epochs}-epoch schedule), "
            f"ranking terms {RANKING[a.ranking]}, global batch {a.layout.global_batch} "
            f"({a.layout.describe()}), lr {a.lr}, wd {a.wd}, warm-up {a.warmup}, seed {a.seed}. "
            "T→I: text query retrieves images; I→T: image query retrieves texts. Recall in percent; "
            "test SE: the standard error of RSUM from resampling the test images (bootstrap).\n\n"
        )
        with atomic_write(paths[0], "w") as f:
            f.write(header + self.markdown())
        write_json(
            paths[1],
            {
                "setup": self.setup(),
                "rows": self.rows,
                "paired": self.paired,
                "seconds": self.stages.timings,
            },
        )

    def draw_examples(self, n: int) -> None:
        """retrieval_examples.png: top-5 images per caption before and after EGR + TBR."""
        from experiments.figure import draw_retrieval_examples

        path = self.out / "retrieval_examples.png"
        if not self.folder.owns(path.name):
            self.stages.claim([path])
        draw_retrieval_examples(
            self.lay.test_texts,
            self.lay.test_npz,
            self.files["zeroshot:plain"],
            self.files["zeroshot:EGR+TBR"],
            path,
            n,
        )
        print(f"wrote {path}")
