"""The published tables' protocol: precision / recall from ADM's float16 distances under --fid-mode adm, and the
label protocol of the samples named with every number that came from them (fid, its record, compare)."""
import json
import shutil

import numpy as np
import pytest
import torch

import evaluate as ev
from common import file_hash, save_checkpoint
from test_fid_protocol import stand_in_inception  # noqa: F401  (the fixture)
from test_run_provenance import one_line_error


def inception_like(rng, n, shift=0.0, dims=256):
    """Non-negative features with the norms of Inception's pool features (norms^2 of a few hundred), in fewer
    dimensions (numpy's float16 matmul has no BLAS)."""
    return np.abs(rng.normal(1.0 + shift, 0.85, (n, dims))).astype(np.float32)


def adm_graph_in_numpy(u, v):
    """ADM's _batch_pairwise_distances on tf.cast(features, float16), written in numpy float16."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    nu = np.sum(np.square(u16), 1).reshape(-1, 1)
    nv = np.sum(np.square(v16), 1).reshape(1, -1)
    return np.maximum(nu - np.float16(2) * (u16 @ v16.T) + nv, np.float16(0))


def pr_in_numpy(real, fake, k=3):
    """Improved precision / recall from adm_graph_in_numpy's distances (k-th neighbour, self included at 0)."""
    def radii(f):
        return np.partition(adm_graph_in_numpy(f, f).astype(np.float32), k, axis=1)[:, k]
    precision = (adm_graph_in_numpy(fake, real).astype(np.float32) <= radii(real)[None]).any(1).mean()
    recall = (adm_graph_in_numpy(real, fake).astype(np.float32) <= radii(fake)[None]).any(1).mean()
    return precision, recall


def test_adm_distances_are_adm_float16_graph_and_fall_back_to_float32():
    rng = np.random.default_rng(0)
    u, v = inception_like(rng, 150), inception_like(rng, 200, 0.05)
    ref = adm_graph_in_numpy(u, v)
    ours = ev.adm_distances(torch.tensor(u), torch.tensor(v)).numpy()
    assert ours.dtype == np.float32 and ref.dtype == np.float16
    # equal up to the order of float32 accumulation, which moves a few norms or products by one float16 step
    terms = (np.square(u.astype(np.float64)).sum(1)[:, None] + np.square(v.astype(np.float64)).sum(1)[None])
    assert (np.abs(ours - ref.astype(np.float32)) <= np.spacing(terms.astype(np.float16)).astype(np.float32)).all()
    assert (ours != ref.astype(np.float32)).mean() < 0.01
    exact = ((u.astype(np.float64)[:, None] - v.astype(np.float64)[None]) ** 2).sum(-1)
    assert np.abs(ours - exact).max() > 0.05                          # the float16 path is not the exact one
    # precision / recall on those distances, against the numpy reference and apart from float64
    real, fake = inception_like(rng, 300), inception_like(rng, 250, 0.08)
    p16, r16 = ev.precision_recall(real, fake, k=3, adm=True)
    np_p, np_r = pr_in_numpy(real, fake)
    assert abs(p16 - np_p) <= 2 / 250 and abs(r16 - np_r) <= 2 / 300
    assert (p16, r16) != ev.precision_recall(real, fake, k=3)           # the float64 numbers differ here
    # an overflow in float16 (norms^2 > 65504): that block is computed in float32, as ADM's tf.cond
    big = (10 + rng.random((5, 2048))).astype(np.float32)
    d = ev.adm_distances(torch.tensor(big), torch.tensor(big[::-1].copy())).numpy()
    assert np.isfinite(d).all() and not np.isfinite(adm_graph_in_numpy(big, big[::-1])).all()
    b = big.astype(np.float64)
    np.testing.assert_allclose(d, ((b[:, None] - b[::-1][None]) ** 2).sum(-1), rtol=1e-3, atol=1.0)


def fid_json(capsys):
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):out.rindex("}") + 1]), out


def test_fid_names_the_label_protocol_and_takes_adm_distances_in_adm_mode(smoke_models, tmp_path, capsys,
                                                                          stand_in_inception):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(smoke_models / "sit" / "last.pt", run / "last.pt")
    real = np.random.default_rng(1).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=real)
    sample = ["sample", "--ckpt", str(run / "last.pt"), "--num-samples", "8", "--sample-steps", "2", "--batch", "8"]
    for labels in ("random", "balanced"):
        ev.main(sample + ["--labels", labels, "--out", str(tmp_path / labels)])
        assert json.loads((tmp_path / labels / "manifest.json").read_text())["labels"] == labels
    ext = {m: ev.InceptionExtractor(stand_in_inception, torch.device("cpu"), verify=False, mode=m)
           for m in ev.FID_MODES}
    for labels, mode in (("random", "adm"), ("balanced", "adm"), ("random", "clean")):
        capsys.readouterr()
        ev.main(["fid", "--samples", str(tmp_path / f"{labels}.npz"), "--ref", str(tmp_path / "ref.npz"),
                 "--fid-mode", mode, "--record", str(run)])
        res, out = fid_json(capsys)
        assert res["labels"] == labels
        assert ("note: the samples' labels are balanced" in out) == (labels == "balanced" and mode == "adm")
        f, rf = ext[mode](np.load(tmp_path / f"{labels}.npz")["arr_0"])[0], ext[mode](real)[0]
        assert (res["precision"], res["recall"]) == pytest.approx(ev.precision_recall(rf, f, 3, adm=mode == "adm"))
        assert res["pr_distances"] == ("float16, as ADM's evaluator" if mode == "adm" else "float64")
        rec = json.loads((run / "generation_metrics.json").read_text())[res["network"]]
        assert rec["labels"] == labels                              # the record keeps it for compare
    capsys.readouterr()
    ev.main(["fid", "--samples", str(tmp_path / "ref.npz"), "--ref", str(tmp_path / "ref.npz")])
    assert fid_json(capsys)[0]["labels"].startswith("unknown")      # not drawn by `sample`: no manifest


def recorded_run(folder, seed, records):
    """A run folder with last.pt and generation metrics recorded for it: {network: (metrics, labels or None)}."""
    folder.mkdir()
    save_checkpoint(str(folder / "last.pt"), {"kind": "sit", "config": {"seed": seed, "lr": 1e-3}, "step": 4})
    rec = {"path": str(folder / "last.pt"), "step": 4, "content_hash": file_hash(folder / "last.pt")}
    gm = {net: {"network": net, **m, **({"labels": lab} if lab else {}), "checkpoint": rec}
          for net, (m, lab) in records.items()}
    (folder / "generation_metrics.json").write_text(json.dumps(gm))
    return str(folder)


def test_compare_names_the_label_protocol_and_refuses_a_mean_over_two(tmp_path, capsys):
    a = recorded_run(tmp_path / "a", 0, {"Inception": ({"fid": 10.0}, "random")})
    b = recorded_run(tmp_path / "b", 1, {"Inception": ({"fid": 12.0}, "random")})
    ev.main(["compare", a, b, "--out", str(tmp_path / "c1")])
    table = (tmp_path / "c1" / "compare.md").read_text().splitlines()
    assert table[0] == "| runs | seeds | step | fid | sample labels |"
    assert table[2] == f"| all runs | 0,1 | 4 | 11.0000 ± {np.std([10, 12], ddof=1):.4f} | random |"
    c = recorded_run(tmp_path / "c", 2, {"Inception": ({"fid": 9.0}, "balanced")})
    one_line_error(capsys, ev.main, ["compare", a, c, "--out", str(tmp_path / "c2")],
                   "fid of samples drawn with different labels", "random in", "balanced in", str(tmp_path / "c"))
    old = recorded_run(tmp_path / "old", 3, {"DL-net": ({"fd_dl": 1.0}, None),        # recorded before labels were
                                             "Inception": ({"fid": 11.0}, "random")})    # kept: said, not guessed
    ev.main(["compare", old, "--out", str(tmp_path / "c3")])
    assert (tmp_path / "c3" / "compare.md").read_text().splitlines()[2].endswith("| fd_dl unknown, fid random |")


def test_precision_recall_of_sets_too_small_for_k_neighbours_are_left_out_and_said(tmp_path, capsys,
                                                                                    stand_in_inception):  # noqa: F811
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))   # 3 <= k
    np.savez(tmp_path / "r.npz", arr_0=rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8))
    capsys.readouterr()
    ev.main(["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz")])
    res = fid_json(capsys)[0]
    assert "precision" not in res and "recall" not in res and np.isfinite(res["fid"])
    assert res["pr_missing"] == ("precision / recall need more than k = 3 images in each set "
                                 "(3 samples, 10 reference images)")
