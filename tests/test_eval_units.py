"""Top-k, EGR, TBR, recall and feature I/O against independent reference computations.

The array code runs on numpy (the CPU path) and on torch (the CUDA path, run here on the CPU):
every test of it runs both.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from eval import egr as egr_module
from eval import topk as topk_module
from eval.array_ops import NumpyOps, TorchOps, array_ops
from eval.egr import egr_lists, pair_slot_dots
from eval.feature_io import (
    Features,
    FeatureWriter,
    align_slots,
    detect_layout,
    non_finite_rows,
    read_features,
    sidecar_path,
)
from eval.metrics import recall
from eval.predictions import as_ranked_lists
from eval.tbr import tbr_rerank
from eval.topk import chunked_topk, item_blocks, topk_lists, topk_of_scores

OPS = {"numpy": NumpyOps(), "torch": TorchOps("cpu")}


@pytest.fixture(params=sorted(OPS))
def ops(request):
    return OPS[request.param]


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def full_sort_topk(scores: np.ndarray, k: int):
    """Oracle: a stable sort of each row by score descending (ties: lower index first)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def test_chunked_topk_equals_full_sort_across_query_and_item_chunks(ops):
    rng = np.random.default_rng(0)
    q, items, extras = (
        rng.standard_normal(s).astype(np.float32) for s in ((23, 8), (50, 8), (23, 2, 8))
    )
    ref_s, ref_i = full_sort_topk(q.astype(np.float64) @ items.T.astype(np.float64), 9)
    got = list(
        chunked_topk(
            ops,
            ops.asarray(q),
            ops.asarray(items),
            k=9,
            chunk=5,
            extras=ops.asarray(extras),
            item_chunk=7,
        )
    )
    assert [start for start, *_ in got] == [0, 20]  # 5 x 4 queries per pass in blocks of 7 items
    s, i, x = (np.concatenate([ops.to_numpy(t[j]) for t in got]) for j in (1, 2, 3))
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x, np.einsum("qed,qkd->qke", extras, items[i]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 5, 40])
@pytest.mark.parametrize("item_chunk", [2, 3, 1000])
def test_topk_ties_go_to_the_lower_item_index_also_at_the_kth_place(
    ops, k, item_chunk, monkeypatch
):
    monkeypatch.setattr(topk_module, "FIRST_BLOCK", 2)  # small first blocks: the floor prunes ties
    rng = np.random.default_rng(k)
    # integer features: exact products with many ties, in every block and across block borders
    items = rng.integers(-1, 2, (37, 3)).astype(np.float32)
    q = rng.integers(-1, 2, (11, 3)).astype(np.float32)
    ref_s, ref_i = full_sort_topk(q @ items.T, k)
    got = list(
        chunked_topk(ops, ops.asarray(q), ops.asarray(items), k=k, chunk=4, item_chunk=item_chunk)
    )
    i = np.concatenate([ops.to_numpy(t[2]) for t in got])
    s = np.concatenate([ops.to_numpy(t[1]) for t in got])
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(s, ref_s)


def test_chunked_topk_orders_ties_by_item_index(ops):
    items = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    ((_, s, i, _),) = chunked_topk(
        ops, ops.asarray(np.array([[1.0, 0.0]])), ops.asarray(items), k=5, chunk=8, item_chunk=2
    )
    assert ops.to_numpy(i).tolist() == [[1, 3, 0, 2, 4]]
    assert ops.to_numpy(s).tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]]


def test_numpy_topk_with_a_floor_keeps_only_entries_above_it():
    x = np.array([[5.0, 1.0, 7.0, 3.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    s, i = NumpyOps().topk(x, 3, floor=np.array([2.0, 0.0], np.float32))
    assert s.tolist() == [[7.0, 5.0, 3.0], [-np.inf, -np.inf, -np.inf]]
    assert i[0].tolist() == [2, 0, 3]


def test_item_blocks_grow_from_the_first_block_and_cover_every_item():
    blocks = list(item_blocks(10_000, k=10, item_chunk=4096))
    assert blocks[:3] == [(0, 1024), (1024, 3072), (3072, 7168)]
    assert blocks[-1] == (7168, 10_000)
    assert list(item_blocks(100, k=300, item_chunk=4096)) == [(0, 100)]


def test_topk_of_scores_equals_full_sort(ops):
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 4, (9, 30)).astype(np.float32)
    got = list(topk_of_scores(ops, ops.asarray(scores), k=6, chunk=4, item_chunk=5))
    ref_s, ref_i = full_sort_topk(scores, 6)
    np.testing.assert_array_equal(np.concatenate([ops.to_numpy(t[2]) for t in got]), ref_i)


@pytest.mark.parametrize("keep_scores", [True, False])
def test_topk_lists_both_directions_equal_full_sorts(ops, keep_scores, monkeypatch):
    if not keep_scores:
        monkeypatch.setattr(topk_module, "SHARED_SCORES_MAX", 0)
    rng = np.random.default_rng(5)
    txt, img = (
        rng.standard_normal((13, 6)).astype(np.float32),
        rng.standard_normal((7, 6)).astype(np.float32),
    )
    text = Features(Path("t"), "query_id", list(range(13)), txt)
    image = Features(Path("i"), "image_id", [f"i{j}" for j in range(7)], img)
    t2i, i2t = topk_lists(ops, text, image, k=4, chunk=5)
    s = txt.astype(np.float64) @ img.T.astype(np.float64)
    assert t2i == [(q, [f"i{j}" for j in np.argsort(-s[q], kind="stable")[:4]]) for q in range(13)]
    assert i2t == [
        (f"i{j}", [int(q) for q in np.argsort(-s[:, j], kind="stable")[:4]]) for j in range(7)
    ]


def test_pair_slot_dots_equals_direct_products_with_split_groups_and_padding(ops):
    rng = np.random.default_rng(1)
    left, right_a, right_b = (
        rng.standard_normal(s).astype(np.float32) for s in ((30, 6), (12, 3, 6), (12, 5, 6))
    )
    right_idx = np.concatenate([np.full(40, 4), rng.integers(0, 12, 60)])  # row 4 is a "hub"
    left_idx = rng.integers(0, 30, 100)
    as_int = (lambda a: torch.from_numpy(a)) if ops.name == "torch" else (lambda a: a)
    out_a, out_b = pair_slot_dots(
        ops,
        ops.asarray(left),
        as_int(left_idx),
        as_int(right_idx),
        [ops.asarray(right_a), ops.asarray(right_b)],
        block=6 * 8,
    )  # groups of <= 8 pairs
    np.testing.assert_allclose(
        ops.to_numpy(out_a),
        np.einsum("psd,pd->ps", right_a[right_idx], left[left_idx]),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        ops.to_numpy(out_b),
        np.einsum("psd,pd->ps", right_b[right_idx], left[left_idx]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_order_by_b_then_a_is_two_stable_descending_sorts(ops):
    a = ops.f64(ops.asarray(np.array([[1.0, 2.0, 2.0, 3.0]])))
    b = ops.f64(ops.asarray(np.array([[5.0, 5.0, 5.0, 4.0]])))
    # by a: [3, 1, 2, 0]; then by b (stable): b = [4, 5, 5, 5] -> [1, 2, 0, 3]
    assert ops.to_numpy(ops.order_by_b_then_a(a, b)).tolist() == [[1, 2, 0, 3]]


@pytest.mark.parametrize("levels", [3, 1000000])  # many ties / almost none
def test_order_by_b_then_a_agrees_with_python_stable_sorts(ops, levels):
    rng = np.random.default_rng(levels)
    a_np = rng.integers(0, levels, (40, 25)).astype(np.float64)
    b_np = rng.integers(0, levels, (40, 25)).astype(np.float64)
    got = ops.to_numpy(
        ops.order_by_b_then_a(ops.f64(ops.asarray(a_np)), ops.f64(ops.asarray(b_np)), 7)
    )
    for r in range(40):
        by_a = sorted(range(25), key=lambda j: -a_np[r, j])
        want = sorted(by_a, key=lambda j: -b_np[r, j])[:7]
        assert got[r].tolist() == want


def test_cpu_device_needs_no_torch_and_other_devices_are_named():
    assert isinstance(array_ops(None), NumpyOps) and isinstance(array_ops("cpu"), NumpyOps)
    with pytest.raises(Exception, match="--device"):
        array_ops("tpu")


def reference_egr(txt, img, prm, msk, n_real, real_only, pool, top_k):
    """EGR (docs/method.md §5.3) with plain Python loops in float64 (test oracle)."""
    txt, img, prm, msk = (np.asarray(x, dtype=np.float64) for x in (txt, img, prm, msk))
    n_slots = prm.shape[1]

    def slots_of(t):
        return range(n_real[t]) if real_only else range(n_slots)

    def rank(cands):  # cands: (item, s, a, b) in s order
        by_a = sorted(cands, key=lambda c: -c[2])
        return sorted(by_a, key=lambda c: -c[3])[:top_k]

    t2i, i2t = [], []
    for t in range(len(txt)):
        s_all = img @ txt[t]
        cand = sorted(range(len(img)), key=lambda i: (-s_all[i], i))[:pool]
        rows = []
        for i in cand:
            s = s_all[i]
            js = list(slots_of(t))
            a = 0.9 * s + 0.1 * sum(s - msk[t, j] @ img[i] for j in js)
            p = sum(prm[t, j] @ img[i] for j in js) / len(js) if js else s
            rows.append((i, s, a, 0.99 * a + 0.01 * p))
        t2i.append(rank(rows))
    for i in range(len(img)):
        s_all = txt @ img[i]
        cand = sorted(range(len(txt)), key=lambda t: (-s_all[t], t))[:pool]
        rows = []
        for t in cand:
            s = s_all[t]
            js = list(slots_of(t))
            p = sum(prm[t, j] @ img[i] for j in js) / len(js) if js else s
            a = 0.8 * s + 0.2 * p
            rows.append(
                (t, s, a, 0.98 * a + 0.02 * sum(min(0.0, s - msk[t, j] @ img[i]) for j in js))
            )
        i2t.append(rank(rows))
    return t2i, i2t


@pytest.mark.parametrize(
    "real_only,large", [(False, False), (True, False), (False, True), (True, True)]
)
def test_egr_matches_a_loop_implementation_of_the_spec(ops, real_only, large, monkeypatch):
    if large:  # the large-gallery paths: each direction computes its own products, slots on candidates only
        monkeypatch.setattr(topk_module, "SHARED_SCORES_MAX", 0)
        monkeypatch.setattr(egr_module, "EXTRAS_IN_PRODUCT", 0)
    rng = np.random.default_rng(3)
    n_img, n_txt, n_slots, dim = 9, 20, 4, 8
    img = unit(rng.standard_normal((n_img, dim))).astype(np.float32)
    txt = unit(rng.standard_normal((n_txt, dim))).astype(np.float32)
    n_real = rng.integers(0, n_slots + 1, size=n_txt)
    n_real[0] = 0  # a caption without entities
    pad = unit(rng.standard_normal(dim))
    prm, msk = (
        np.where(
            np.arange(n_slots)[None, :, None] < n_real[:, None, None],
            unit(rng.standard_normal((n_txt, n_slots, dim))),
            pad,
        ).astype(np.float32)
        for _ in range(2)
    )
    img_ids = [f"img{i}" for i in range(n_img)]
    txt_ids = list(range(100, 100 + n_txt))
    feats = dict(
        text=Features(Path("t"), "query_id", txt_ids, txt),
        image=Features(Path("i"), "image_id", img_ids, img),
        prompt=Features(Path("p"), "query_id", txt_ids, prm, n_real),
        mask=Features(Path("m"), "query_id", txt_ids, msk, n_real),
    )
    t2i, i2t = egr_lists(ops, **feats, top_k=5, chunk=4, real_only=real_only, pool=7)
    ref_t2i, ref_i2t = reference_egr(txt, img, prm, msk, n_real, real_only, pool=7, top_k=5)
    for got_rows, ref_rows, q_ids, it_ids in (
        (t2i, ref_t2i, txt_ids, img_ids),
        (i2t, ref_i2t, img_ids, txt_ids),
    ):
        assert [q for q, _ in got_rows] == q_ids
        for (_, got), ref in zip(got_rows, ref_rows):
            assert [e[0] for e in got] == [it_ids[r[0]] for r in ref]
            np.testing.assert_allclose(
                [e[1:] for e in got], [r[1:] for r in ref], rtol=0, atol=1e-6
            )


def test_real_slots_only_changes_the_ranking_when_pads_dominate(ops):
    # three "" pad mask slots equal to image a's feature penalise a under the released formula
    img = np.eye(3, dtype=np.float32)
    txt = unit(np.array([[1.0, 0.9, 0.0]], dtype=np.float32))
    e1, e3 = [1.0, 0, 0], [0, 0, 1.0]
    prm = np.array([[e3] * 4], dtype=np.float32)
    msk = np.array([[e3, e1, e1, e1]], dtype=np.float32)
    feats = dict(
        text=Features(Path("t"), "query_id", [0], txt),
        image=Features(Path("i"), "image_id", ["a", "b", "c"], img),
        prompt=Features(Path("p"), "query_id", [0], prm, np.array([1])),
        mask=Features(Path("m"), "query_id", [0], msk, np.array([1])),
    )
    plain = egr_lists(ops, **feats, top_k=3, chunk=1)[0][0][1]
    real = egr_lists(ops, **feats, top_k=3, chunk=1, real_only=True)[0][0][1]
    s_a = float(txt[0, 0])
    assert [e[0] for e in plain] == [
        "b",
        "a",
        "c",
    ]  # a = 0.9 s + 0.1 ((s - 0) + 3 (s - 1)) for image a
    assert plain[1][2] == pytest.approx(0.9 * s_a + 0.1 * (4 * s_a - 3), abs=1e-6)
    assert [e[0] for e in real] == ["a", "b", "c"]
    assert real[0][2] == pytest.approx(s_a, abs=1e-6)  # 0.9 s + 0.1 (s - 0)


def lists(key, rows):
    return as_ranked_lists("mem", key, rows)


def test_tbr_rule_on_a_hand_example():
    # text 1 -> images [A, B, C]; B and C rank text 1 higher than A does
    fwd = lists("query_id", [(1, ["A", "B", "C"]), (2, ["A", "C"])])
    back = lists("image_id", [("A", [2, 7, 9]), ("B", [1, 2]), ("C", [1, 2])])
    # q=1: top item A ranks q nowhere -> scores A (0+10000)/2, B (1+0)/2, C (2+0)/2 -> [B, C, A]
    # q=2: top item A ranks q first -> kept as is
    assert tbr_rerank(fwd, back) == [(1, ["B", "C", "A"]), (2, ["A", "C"])]


def test_tbr_ties_keep_forward_order_and_ids_compare_as_strings():
    fwd = lists("image_id", [("7", [3, 4, 5])])
    back = lists("query_id", [(3, [8]), ("4", ["7"]), (5, [9, 7])])  # 4 given as a string: same id
    # scores: 3 -> (0+10000)/2, 4 -> (1+0)/2 = 0.5, 5 -> (2+1)/2 = 1.5
    assert tbr_rerank(fwd, back) == [("7", [4, 5, 3])]
    fwd = lists("image_id", [("7", [3, 4])])
    back = lists("query_id", [(3, [1, 7]), (4, [7])])  # scores 0.5 and 0.5: tie, forward order
    assert tbr_rerank(fwd, back) == [("7", [3, 4])]


def test_recall_counts_first_gold_hit_and_compares_ids_as_strings():
    gt = lists("query_id", [(0, [10]), (1, [11, 12]), (2, ["13"]), (3, [14])])
    ranked = list(range(100, 120))
    pred = lists(
        "query_id",
        [
            ("0", [10] + ranked),  # R@1
            (1, ranked[:3] + ["12"] + ranked),  # rank 4 -> R@5
            (2, ranked[:7] + [13]),  # rank 8 -> R@10
            (3, ranked),  # miss
        ],
    )
    r = recall(gt, pred)
    assert (r["r1"], r["r5"], r["r10"]) == (25.0, 50.0, 75.0)
    assert r["mean"] == pytest.approx(50.0)


@pytest.mark.parametrize("ext", ["jsonl", "npy"])
def test_feature_files_round_trip_with_ids_as_given(tmp_path, ext):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((5, 3, 4)).astype(np.float32)
    ids = [3, "x", 5, "007", 9]
    path = tmp_path / f"f.{ext}"
    with FeatureWriter(path, "query_id", slots=True) as w:
        w.add(ids[:2], data[:2], [1, 3])
        w.add(ids[2:], data[2:], [0, 2, 3])
    assert detect_layout(path) == ("query_id", True)
    f = read_features(path, "query_id", slots=True)
    assert f.ids == ids
    assert f.n_real.tolist() == [1, 3, 0, 2, 3]
    np.testing.assert_array_equal(f.data, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [path.name] + ([sidecar_path(path).name] if ext == "npy" else [])
    )


def test_align_slots_follows_the_text_feature_order():
    text = Features(Path("t"), "query_id", [2, 0, 1], np.zeros((3, 2), np.float32))
    data = np.arange(3, dtype=np.float32)[:, None, None] * np.ones((3, 2, 2), np.float32)
    slots = Features(Path("s"), "query_id", ["0", "1", "2"], data, np.array([0, 1, 2]))
    out = align_slots(text, slots)
    assert out.ids == ["2", "0", "1"]
    assert out.data[:, 0, 0].tolist() == [2.0, 0.0, 1.0]
    assert out.n_real.tolist() == [2, 0, 1]


def test_writer_leaves_nothing_when_interrupted(tmp_path):
    for ext in ("jsonl", "npy"):
        with pytest.raises(RuntimeError):
            with FeatureWriter(tmp_path / f"f.{ext}", "image_id") as w:
                w.add(["a"], np.ones((1, 3), np.float32))
                raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_rows_finds_nan_and_inf_but_not_large_finite_rows():
    data = np.ones((5, 2, 3), np.float32)
    data[1, 0, 0] = np.nan
    data[3, 1, 2] = -np.inf
    data[4] = 3e38  # finite entries whose float32 sum overflows
    assert non_finite_rows(data).tolist() == [1, 3]


def test_re_ranking_scripts_on_the_cpu_do_not_import_torch(tmp_path):
    """numpy serves --device cpu: the scripts that only read feature and prediction files never load torch."""
    import subprocess
    import sys

    fix = Path(__file__).resolve().parent / "fixtures" / "rerank_small" / "inputs"
    out = tmp_path
    feats = [f"--image-feats={fix / 'img_feat.jsonl'}", f"--text-feats={fix / 'txt_feat.jsonl'}"]
    runs = {
        "eval/make_topk_predictions.py": feats
        + [f"--output-images={out / 'i.jsonl'}", f"--output-texts={out / 't.jsonl'}"],
        "eval/make_topk_predictions_mask+prompt.py": feats
        + [
            f"--mask-feats={fix / 'mask_feat.jsonl'}",
            f"--prompt-feats={fix / 'prompt_feat.jsonl'}",
            f"--output-images={out / 'im.jsonl'}",
            f"--output-texts={out / 'tm.jsonl'}",
        ],
        "eval/eval_back_retrieval.py": [
            str(fix / "test_images.jsonl"),
            str(out / "im.jsonl"),
            str(fix / "test_texts.jsonl"),
            str(out / "tm.jsonl"),
            str(out / "ir.jsonl"),
            str(out / "tr.jsonl"),
        ],
        "eval/evaluation.py": [
            str(fix / "test_texts.jsonl"),
            str(out / "tr.jsonl"),
            str(out / "s.json"),
            "query_id",
        ],
    }
    root = Path(__file__).resolve().parents[1]
    probe = (
        "import atexit, runpy, sys; atexit.register(lambda: print('torch loaded:', 'torch' in sys.modules)); "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    for script, argv in runs.items():
        proc = subprocess.run(
            [sys.executable, "-c", probe, str(root / script), *argv],
            capture_output=True,
            text=True,
            cwd=root,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().endswith("torch loaded: False"), (script, proc.stdout)


@pytest.mark.parametrize("k", [1, 7, 40])
def test_faiss_first_stage_gives_the_same_lists_bar_ties_at_the_kth_place(k):
    pytest.importorskip("faiss")  # optional dependency
    rng = np.random.default_rng(k)
    items = rng.integers(-1, 2, (300, 4)).astype(np.float32)  # integer scores: exact, many ties
    q = rng.integers(-1, 2, (50, 4)).astype(np.float32)
    ops = NumpyOps()
    ours = list(chunked_topk(ops, q, items, k, chunk=16))
    theirs = list(topk_module.faiss_topk(ops, q, items, k, chunk=16))
    s_ours, i_ours = (np.concatenate([t[j] for t in ours]) for j in (1, 2))
    s_faiss, i_faiss = (np.concatenate([t[j] for t in theirs]) for j in (1, 2))
    np.testing.assert_array_equal(s_faiss, s_ours)
    # FAISS picks its own among items tied at the k-th score; above it the lists are identical
    above = s_ours > s_ours[:, -1:]
    np.testing.assert_array_equal(np.where(above, i_faiss, -1), np.where(above, i_ours, -1))
    np.testing.assert_array_equal(np.take_along_axis(q @ items.T, i_faiss, 1), s_ours)
    for row_s, row_i in zip(s_faiss, i_faiss):  # ties inside a list come by ascending index
        for a in range(len(row_s) - 1):
            assert row_s[a] > row_s[a + 1] or row_i[a] < row_i[a + 1]


def test_faiss_flag_without_faiss_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(Exception, match="pip install faiss-cpu"):
        list(
            topk_module.faiss_topk(
                NumpyOps(), np.ones((2, 3), np.float32), np.ones((4, 3), np.float32), 2, 1
            )
        )
