"""The demo's record and pictures: rows with per-seed numbers, mean and sd (results.json), the paper-style
tables (results.md), RSUM per method with error bars (rsum.png), and wins and losses (retrieval_examples.png)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional

import numpy as np

from agree.io import atomic_path, atomic_write, write_json
from agree.metrics import ROW_KEYS
from eval.rerankers import FINE_TUNED_CHAINS, PLAIN, ZERO_SHOT_CHAINS
from eval.rerankers import label as chain_label
from experiments.measure import EvalSplit, Scored
from experiments.stats import (
    bootstrap_rsum_se,
    duplicate_rows,
    paired_difference,
    summarise_seeds,
    verdict,
)


def method_label(model: str, chain: str) -> str:
    """Row label of a model re-ranked by a chain: "CLIP", "CLIP+EGR+TBR", "AGREE+TBR"."""
    variant = chain_label(chain)
    return model if variant == PLAIN else f"{model}+{variant}"


ZERO_SHOT_ROWS = tuple((method_label("CLIP", c), chain_label(c)) for c in ZERO_SHOT_CHAINS)
EXAMPLES_PER_SIDE = 3
TWIN_SCORES = ("text", "image", "group")


def _twin_mean(per_seed: list[dict]) -> dict:
    """Twin scores averaged over seeds, per kind (standard errors and n of one seed's pairs kept beside)."""
    out = {}
    for kind in per_seed[0]:
        row = {s: float(np.mean([t[kind][s] for t in per_seed])) for s in TWIN_SCORES}
        row |= {
            f"{s}_se": float(np.mean([t[kind][f"{s}_se"] for t in per_seed])) for s in TWIN_SCORES
        }
        out[kind] = row | {"n": per_seed[0][kind]["n"]}
    return out


def _row(
    section: str,
    method: str,
    seeds: list[Optional[int]],
    scored: list[Scored],
    variant: str,
    caps_per_image: int,
    twins: bool,
) -> dict:
    per_seed = [
        {"seed": s, **{k: round(v, 4) for k, v in sc.rows[variant].items()}}
        for s, sc in zip(seeds, scored)
    ]
    for entry, sc in zip(per_seed, scored):
        if twins and sc.twins is not None:
            entry["twin"] = sc.twins
    mean, sd = summarise_seeds(per_seed)
    se = [bootstrap_rsum_se(*sc.ranks[variant], caps_per_image) for sc in scored]
    row = {
        "section": section,
        "method": method,
        "per_seed": per_seed,
        "mean": mean,
        "sd": sd,
        "test_se": {"rsum": float(np.mean(se))},
    }
    row["twin"] = (
        _twin_mean([e["twin"] for e in per_seed]) if all("twin" in e for e in per_seed) else {}
    )
    return row


def build_rows(
    measured, split: EvalSplit, methods: list[tuple[str, tuple]], seeds: tuple[int, ...]
) -> list[dict]:
    """Every table row once: zero-shot (no training seed), fine-tuned (global-only, AGREE, AGREE+TBR), ablation."""
    per = split.caps_per_image
    rows = []
    for method, variant in ZERO_SHOT_ROWS:
        if variant in measured.zero_shot.rows:
            rows.append(
                _row(
                    "zero-shot",
                    method,
                    [None],
                    [measured.zero_shot],
                    variant,
                    per,
                    variant == "plain",
                )
            )
    for label, _ in methods:
        scored = [measured.fine_tuned[(label, s)] for s in seeds]
        section = "ablation" if label.startswith("AGREE w/o") else "fine-tuned"
        rows.append(_row(section, label, list(seeds), scored, "plain", per, True))
        if label == "AGREE":  # the paper re-ranks its fine-tuned AGREE model
            for chain in FINE_TUNED_CHAINS:
                if chain:
                    variant = chain_label(chain)
                    row = _row(
                        section,
                        method_label(label, chain),
                        list(seeds),
                        scored,
                        variant,
                        per,
                        False,
                    )
                    rows.append(row)
    dups = duplicate_rows(rows)
    if dups:
        raise AssertionError(f"duplicate table rows: {dups}")
    return rows


def paired(rows: list[dict], a: str = "AGREE", b: str = "global-only") -> Optional[dict]:
    """AGREE - global-only RSUM, paired by seed: mean, sd, n and one sentence."""
    by = {r["method"]: {e["seed"]: e["rsum"] for e in r["per_seed"]} for r in rows}
    if a not in by or b not in by:
        return None
    m, s, n = paired_difference(by[a], by[b])
    return {"mean": m, "sd": s, "n": n, "sentence": verdict(m, s, n, f"{a} - {b}")}


# ---------------------------------------------------------------- markdown


def _pm(mean: float, sd: float, seeded: bool) -> str:
    return f"{mean:.2f} ± {sd:.2f}" if seeded else f"{mean:.2f}"


def markdown(record: dict) -> str:
    """results.md: the tables as in the paper (mean ± sd over seeds), paired difference, twin scores."""
    rec = record["recipe"]
    split = record["eval_split"]
    lines = [f"# AGREE demo ({record['preset']} preset)", ""]
    if len(rec["seeds"]) < 2:
        lines += ["**One training seed: a first look, no claims.**", ""]
    lines += [
        f"Scored on the {split} split ({record['sizes']['eval_images']} images, "
        f"{record['sizes']['eval_captions']} captions); recall in percent. Fine-tuned rows: mean ± sd over "
        f"training seeds {', '.join(map(str, rec['seeds']))} (data seed {rec['data_seed']} fixed). Zero-shot "
        f"rows have no training seed; the last column gives every row's {split}-sampling standard error of "
        f"RSUM (bootstrap over {split} images).",
        "",
    ]
    for section, title in (
        ("zero-shot", "Zero-shot re-ranking"),
        ("fine-tuned", "Fine-tuning"),
        ("ablation", "Ablation (AGREE minus one term, no re-ranking)"),
    ):
        rows = [r for r in record["rows"] if r["section"] == section]
        if not rows:
            continue
        lines += [
            f"### {title}",
            "",
            f"| Method | T→I R@1 | R@5 | R@10 | I→T R@1 | R@5 | R@10 | RSUM | {split} SE |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            seeded = r["per_seed"][0]["seed"] is not None and len(r["per_seed"]) > 1
            cells = [_pm(r["mean"][k], r["sd"][k], seeded) for k in ROW_KEYS]
            lines.append(
                f"| {r['method']} | " + " | ".join(cells) + f" | {r['test_se']['rsum']:.2f} |"
            )
        lines.append("")
    if record.get("paired"):
        lines += [f"**Paired difference.** {record['paired']['sentence']}", ""]
    twin_rows = [r for r in record["rows"] if r["twin"]]
    if twin_rows:
        kinds = list(twin_rows[0]["twin"])
        lines += [
            "### Twin test (Winoground-style text / image / group scores, percent ± standard error)",
            "",
            f"{twin_rows[0]['twin']['all']['n']} pairs: "
            + ", ".join(f"{k} {twin_rows[0]['twin'][k]['n']}" for k in kinds if k != "all")
            + ". Chance: text 25, image 25, group 16.7.",
            "",
            "| Method | " + " | ".join(f"{k} text / image / group" for k in kinds) + " |",
            "|---|" + "---:|" * len(kinds),
        ]
        for r in twin_rows:
            cells = [
                " / ".join(f"{r['twin'][k][s]:.1f}" for s in TWIN_SCORES)
                + f" (±{max(r['twin'][k][s + '_se'] for s in TWIN_SCORES):.1f})"
                for k in kinds
            ]
            lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
        lines.append("")
    found = record.get("backbone", {}).get("entities_found")
    if found:
        lines += [
            f"Backbone: {found['entities']:.1f}% of zero-shot T→I top-1 images contain every entity the query "
            f"names (shape, colour and size as named; {found['entities_chance']:.1f}% for an image drawn at "
            f"random); {found['shapes']:.1f}% contain every shape it names ({found['shapes_chance']:.1f}% at "
            "random).",
            "",
        ]
    if record.get("examples"):
        e = record["examples"]
        lines += [
            f"T→I top-1, AGREE vs global-only (seed {e['seed']}), over all {e['queries']} queries: "
            f"{e['wins']} wins, {e['losses']} losses, {e['ties']} ties.",
            "",
        ]
    lines += [
        "Seconds per stage: "
        + ", ".join(f"{k} {v:.0f}" for k, v in record["seconds"].items())
        + f"; total {sum(record['seconds'].values()) / 60:.1f} min.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- pictures


def plot_rsum(rows: list[dict], path: Path) -> None:
    """RSUM per method: mean with sd over seeds (fine-tuned) or test-sampling SE (zero-shot) as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    for x, r in enumerate(rows):
        zs = r["section"] == "zero-shot"
        err = r["test_se"]["rsum"] if zs else r["sd"]["rsum"]
        ax.errorbar(
            [x],
            [r["mean"]["rsum"]],
            yerr=[err],
            fmt="s" if zs else "o",
            capsize=4,
            color="tab:gray"
            if zs
            else ("tab:blue" if r["section"] == "fine-tuned" else "tab:orange"),
        )
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["method"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("RSUM (sum of six recalls, %)")
    ax.set_title(
        "grey squares: zero-shot ± test-sampling SE; dots: fine-tuned mean ± sd over seeds",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def compare_top1(split: EvalSplit, a: list, b: list) -> dict:
    """Per query, is method a's / b's T2I top-1 correct: wins (a right, b wrong), losses, ties."""
    gold = [set(map(str, split.t2i_gt.get(q) or [])) for q, _ in split.captions]
    ok_a = np.array([str(x) in g for x, g in zip(a, gold)])
    ok_b = np.array([str(x) in g for x, g in zip(b, gold)])
    wins, losses = np.flatnonzero(ok_a & ~ok_b), np.flatnonzero(~ok_a & ok_b)
    return {"wins": wins, "losses": losses, "ties": int(len(gold) - len(wins) - len(losses))}


def example_panels(
    split: EvalSplit, a: list, b: list, shown: list[tuple[str, int]]
) -> list[tuple[str, list[tuple[object, str]]]]:
    """Per shown query: its whole caption, and two panels (item id, title): the correct image, which is
    the top-1 of the method that got it right, and the other method's wrong top-1."""
    out = []
    for what, i in shown:
        qid, text = split.captions[i]
        gold = (split.t2i_gt.get(qid) or [None])[0]
        right, wrong = ("AGREE", "global-only") if what == "win" else ("global-only", "AGREE")
        other = b[i] if what == "win" else a[i]
        out.append(
            (text, [(gold, f"correct image = {right} top-1"), (other, f"{wrong} top-1 (wrong)")])
        )
    return out


def draw_examples(
    split: EvalSplit, a: list, b: list, seed: int, path: Path, sample_seed: int = 0
) -> dict:
    """retrieval_examples.png: a fixed random sample of wins and of losses of AGREE vs global-only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from agree.images import ImageArchive
    from experiments.figure import displayable

    cmp = compare_top1(split, a, b)
    rng = np.random.default_rng(sample_seed)
    shown = [("win", int(i)) for i in rng.permutation(cmp["wins"])[:EXAMPLES_PER_SIDE]]
    shown += [("loss", int(i)) for i in rng.permutation(cmp["losses"])[:EXAMPLES_PER_SIDE]]
    archive = ImageArchive(split.images)
    keys = {str(k): k for k in archive.keys()}
    panels = example_panels(split, a, b, shown)
    fig, axes = plt.subplots(
        max(1, len(shown)), 2, figsize=(5.5, 2.9 * max(1, len(shown))), squeeze=False
    )
    for row, (what, _), (text, pair) in zip(axes, shown, panels):
        for ax, (item, title) in zip(row, pair):
            ax.imshow(displayable(archive[keys[str(item)]]))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(title, fontsize=8)
        row[0].set_ylabel(
            f"{what.upper()}", fontsize=9, color="tab:green" if what == "win" else "tab:red"
        )
        row[0].set_title("\n".join(textwrap.wrap(f"“{text}”", 70)), loc="left", fontsize=8)
    n = len(split.captions)
    fig.suptitle(
        f"Rule: {EXAMPLES_PER_SIDE} wins and {EXAMPLES_PER_SIDE} losses of AGREE vs global-only, drawn at random "
        f"(seed {sample_seed})\namong the queries whose T→I top-1 is right for one method only (training seed "
        f"{seed}).\nOver all {n} queries: {len(cmp['wins'])} wins, {len(cmp['losses'])} losses, {cmp['ties']} "
        "ties (both right or both wrong).",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return {
        "seed": seed,
        "queries": n,
        "wins": len(cmp["wins"]),
        "losses": len(cmp["losses"]),
        "ties": cmp["ties"],
        "shown": [{"query_id": split.captions[i][0], "outcome": w} for w, i in shown],
    }


def write_report(out: Path, record: dict) -> None:
    """results.json and results.md under `out`."""
    write_json(out / "results.json", record)
    with atomic_write(out / "results.md", "w") as f:
        f.write(markdown(record))
