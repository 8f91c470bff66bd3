"""Table reproduction: runs the README's recipes stage by stage and collects the recall tables."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from agree.io import InputError, atomic_write, read_json, write_json
from agree.layout import Layout
from training.terms import AGREE_TERMS, OPTIONAL, flags_of

REPO = Path(__file__).resolve().parents[1]
RECIPE_EPOCH = 2  # the README recipe evaluates checkpoints/epoch_2.pt
SECTIONS = {
    "zeroshot": "Zero-shot re-ranking",
    "finetune": "Fine-tuning",
    "ablation": "Ablation (fine-tuned, no re-ranking)",
}


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


def fine_tune_flags(args: argparse.Namespace) -> list[str]:
    """main_all.py flags that the table runner passes through to every fine-tuning run."""
    flags = [f"--save-frequency={args.epoch}", f"--stop-after-epoch={args.epoch}"]
    if args.nproc is not None:
        flags.append(f"--nproc={args.nproc}")
    if args.legacy_detached_rank:
        flags.append("--legacy-detached-rank")
    if args.max_missing_fraction is not None:
        flags.append(f"--max-missing-fraction={args.max_missing_fraction}")
    if args.precision:
        flags.append(f"--precision={args.precision}")
    if args.jit:
        flags.append("--jit")
    return flags


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_").replace("__", "_")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TableRunner:
    """Runs each experiment through the README's scripts and keeps its recall row."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.lay = Layout.from_data_dir(args.data_root, args.dataset, args.vg_root)
        self.out = Path(args.out)
        self.logs = self.out / "logs"
        self.rows: list[dict] = []
        self.timings: dict[str, float] = {}
        self.files: dict[str, Path] = {}
        for path in self.lay.test_files():
            if not path.is_file():
                raise InputError(f"--data-root: {path} not found")
        if not Path(args.pretrained).is_file():
            raise InputError(f"--pretrained: checkpoint not found: {args.pretrained}")

    # ------------------------------------------------------------------ plumbing
    def _device_flags(self) -> list[str]:
        return ["--device", self.args.device] if self.args.device else []

    def _jit_flags(self) -> list[str]:
        return ["--jit"] if self.args.jit else []

    def run(self, stage: str, script: str, *flags: str) -> None:
        """Run one README script; its output goes to logs/<stage>.log; a failure stops everything."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{stage}.log"
        cmd = [sys.executable, "-u", str(REPO / script), *flags]
        start = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {stage} ...", flush=True)
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n\n")
            f.flush()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            rc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env
            ).returncode
        self.timings[stage] = round(time.time() - start, 1)
        if rc != 0:
            tail = log.read_text().splitlines()[-15:]
            raise InputError(
                f"stage {stage!r} failed (exit {rc}); last lines of {log}:\n  " + "\n  ".join(tail)
            )

    def evaluate(self, stage: str, texts_pred: Path, images_pred: Path) -> dict:
        """Recall of both directions through evaluation.py: {'t2i': {...}, 'i2t': {...}}."""
        result = {}
        for direction, gt, pred, key in (
            ("t2i", self.lay.test_texts, texts_pred, "query_id"),
            ("i2t", self.lay.test_images, images_pred, "image_id"),
        ):
            out = pred.with_name(f"score_{pred.stem}.json")
            self.run(
                f"{stage}.eval_{direction}", "eval/evaluation.py", str(gt), str(pred), str(out), key
            )
            scores = read_json(out)["scoreJson"]
            result[direction] = {
                k: round(float(scores[k]), 2) for k in ("r1", "r5", "r10", "mean_recall")
            }
        return result

    def tbr(self, stage: str, images_pred: Path, texts_pred: Path) -> tuple[Path, Path]:
        """TBR re-ranking of a pair of prediction files (README's positional arguments)."""
        images_out = images_pred.with_name(images_pred.stem + "_rerank.jsonl")
        texts_out = texts_pred.with_name(texts_pred.stem + "_rerank.jsonl")
        self.run(
            f"{stage}.tbr",
            "eval/eval_back_retrieval.py",
            str(self.lay.test_images),
            str(images_pred),
            str(self.lay.test_texts),
            str(texts_pred),
            str(images_out),
            str(texts_out),
        )
        return images_out, texts_out

    def topk(
        self,
        stage: str,
        folder: Path,
        img_feat: Path,
        txt_feat: Path,
        suffix: str = "",
        egr_feats: Optional[tuple[Path, Path]] = None,
    ) -> tuple[Path, Path]:
        """make_topk_predictions(.py | _mask+prompt.py) -> (images predictions, texts predictions)."""
        images_pred = folder / f"test_images_predictions{suffix}.jsonl"
        texts_pred = folder / f"test_texts_predictions{suffix}.jsonl"
        flags = [f"--image-feats={img_feat}", f"--text-feats={txt_feat}"]
        script = "eval/make_topk_predictions.py"
        top_k = self.args.top_k
        if egr_feats is not None:
            script = "eval/make_topk_predictions_mask+prompt.py"
            flags += [f"--mask-feats={egr_feats[0]}", f"--prompt-feats={egr_feats[1]}"]
            top_k = self.args.egr_top_k
        flags += [
            f"--top-k={top_k}",
            f"--eval-batch-size={self.args.batch_size_eval}",
            f"--output-images={images_pred}",
            f"--output-texts={texts_pred}",
            *self._device_flags(),
        ]
        self.run(stage, script, *flags)
        return images_pred, texts_pred

    def add_row(self, section: str, label: str, scores: dict) -> None:
        """Keep one table row."""
        t2i, i2t = scores["t2i"], scores["i2t"]
        rsum = round(sum(t2i[k] + i2t[k] for k in ("r1", "r5", "r10")), 2)
        self.rows.append(
            {"section": section, "method": label, "t2i": t2i, "i2t": i2t, "rsum": rsum}
        )
        print(
            f"    {label}: T2I R@1 {t2i['r1']:.2f}  I2T R@1 {i2t['r1']:.2f}  RSUM {rsum:.2f}",
            flush=True,
        )

    # ------------------------------------------------------------------ experiments
    def zero_shot(self) -> None:
        """Pre-trained model: baseline, +TBR, +EGR, +EGR+TBR (README 'Zero-shot Re-ranking')."""
        a = self.args
        folder = self.out / "predictions" / "zeroshot"
        feats = {
            k: folder / f"{self.lay.dataset}_test_{n}"
            for k, n in (
                ("img", "imgs.224.img_feat.jsonl"),
                ("txt", "queries.txt_feat.jsonl"),
                ("mask", "queries.mask_feat.jsonl"),
                ("prompt", "queries.prompt_feat.jsonl"),
            )
        }
        self.run(
            "zeroshot.extract",
            "eval/extract_features_zs_mask+prompt.py",
            "--extract-image-feats",
            "--extract-text-feats",
            "--extract-mask-feats",
            "--extract-prompt-feats",
            f"--image-data={self.lay.test_npz}",
            f"--text-data={self.lay.test_texts}",
            f"--prompt-data={self.lay.test_segs}",
            f"--img-batch-size={a.batch_size_eval}",
            f"--text-batch-size={a.batch_size_eval}",
            f"--resume={a.pretrained}",
            f"--image-feat-output-path={feats['img']}",
            f"--text-feat-output-path={feats['txt']}",
            f"--mask-feat-output-path={feats['mask']}",
            f"--prompt-feat-output-path={feats['prompt']}",
            "--model",
            a.model,
            *self._jit_flags(),
            *self._device_flags(),
        )
        section = SECTIONS["zeroshot"]
        base_i, base_t = self.topk("zeroshot.topk", folder, feats["img"], feats["txt"])
        self.add_row(section, "CLIP zero-shot", self.evaluate("zeroshot.base", base_t, base_i))
        tbr_i, tbr_t = self.tbr("zeroshot.base", base_i, base_t)
        self.add_row(section, "+ TBR", self.evaluate("zeroshot.tbr", tbr_t, tbr_i))
        egr_i, egr_t = self.topk(
            "zeroshot.egr",
            folder,
            feats["img"],
            feats["txt"],
            "_mask+prompt",
            (feats["mask"], feats["prompt"]),
        )
        self.add_row(section, "+ EGR", self.evaluate("zeroshot.egr", egr_t, egr_i))
        both_i, both_t = self.tbr("zeroshot.egr", egr_i, egr_t)
        self.add_row(section, "+ EGR + TBR", self.evaluate("zeroshot.egr_tbr", both_t, both_i))
        self.files.update(zs_base_texts=base_t, zs_rerank_texts=both_t)

    def fine_tuned(self, label: str, terms: Sequence[str], tbr: bool = True) -> None:
        """Fine-tune from the pre-trained checkpoint with the named `terms`, then evaluate (and TBR)."""
        a = self.args
        slug = _slug(label)
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
            f"--batch-size={a.batch_size}",
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
        self.run(f"{slug}.train", "training/main_all.py", *flags)
        checkpoint = runs / slug / "checkpoints" / f"epoch_{a.epoch}.pt"
        folder = self.out / "predictions" / slug
        img_feat = folder / f"{self.lay.dataset}_test_images.img_feat.jsonl"
        txt_feat = folder / f"{self.lay.dataset}_test_texts.txt_feat.jsonl"
        self.run(
            f"{slug}.extract",
            "eval/extract_features.py",
            "--extract-image-feats",
            "--extract-text-feats",
            f"--image-data={self.lay.test_npz}",
            f"--text-data={self.lay.test_texts}",
            f"--img-batch-size={a.batch_size_eval}",
            f"--text-batch-size={a.batch_size_eval}",
            f"--resume={checkpoint}",
            f"--image-feat-output-path={img_feat}",
            f"--text-feat-output-path={txt_feat}",
            "--model",
            a.model,
            *self._device_flags(),
        )
        images_pred, texts_pred = self.topk(f"{slug}.topk", folder, img_feat, txt_feat)
        section = SECTIONS["ablation"] if not tbr else SECTIONS["finetune"]
        self.add_row(section, label, self.evaluate(slug, texts_pred, images_pred))
        if tbr:
            tbr_i, tbr_t = self.tbr(slug, images_pred, texts_pred)
            self.add_row(section, f"{label} + TBR", self.evaluate(f"{slug}.tbr", tbr_t, tbr_i))

    # ------------------------------------------------------------------ output
    def markdown(self) -> str:
        """The tables, laid out like the paper's (R@1/5/10 each way, RSUM)."""
        lines = []
        for section in dict.fromkeys(r["section"] for r in self.rows):
            lines += [
                f"### {section}",
                "",
                "| Method | T→I R@1 | R@5 | R@10 | I→T R@1 | R@5 | R@10 | RSUM |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for r in (r for r in self.rows if r["section"] == section):
                t, i = r["t2i"], r["i2t"]
                lines.append(
                    f"| {r['method']} | {t['r1']:.2f} | {t['r5']:.2f} | {t['r10']:.2f} | "
                    f"{i['r1']:.2f} | {i['r5']:.2f} | {i['r10']:.2f} | {r['rsum']:.2f} |"
                )
            lines.append("")
        return "\n".join(lines)

    def write_results(self) -> None:
        """results.md and results.json under --out."""
        a = self.args
        setup = {
            "dataset": a.dataset,
            "data_root": str(a.data_root),
            "pretrained": str(a.pretrained),
            "model": a.model,
            "device": a.device or "auto",
            "epochs": a.epochs,
            "epoch": a.epoch,
            "batch_size": a.batch_size,
            "nproc": a.nproc if a.nproc is not None else "default",
            "lr": a.lr,
            "wd": a.wd,
            "warmup": a.warmup,
            "seed": a.seed,
            "legacy_detached_rank": a.legacy_detached_rank,
        }
        legacy = " with `--legacy-detached-rank`" if a.legacy_detached_rank else ""
        header = (
            "# AGREE tables\n\n"
            f"Model `{a.model}` from `{a.pretrained}`, data `{a.data_root}`; fine-tuned models: checkpoint "
            f"`epoch_{a.epoch}.pt` (epoch {a.epoch} of a {a.epochs}-epoch schedule){legacy}, "
            f"batch {a.batch_size} per worker, lr {a.lr}, wd {a.wd}, warm-up {a.warmup}. "
            "T→I: text query retrieves images; I→T: image query retrieves texts. Recall in percent.\n\n"
        )
        with atomic_write(self.out / "results.md", "w") as f:
            f.write(header + self.markdown())
        write_json(
            self.out / "results.json", {"setup": setup, "rows": self.rows, "seconds": self.timings}
        )

    def draw_examples(self, n: int) -> None:
        """retrieval_examples.png: top-5 images per caption before and after EGR + TBR."""
        from experiments.figure import draw_retrieval_examples

        path = self.out / "retrieval_examples.png"
        draw_retrieval_examples(
            self.lay.test_texts,
            self.lay.test_npz,
            self.files["zs_base_texts"],
            self.files["zs_rerank_texts"],
            path,
            n,
        )
        print(f"wrote {path}")
