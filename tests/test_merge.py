"""experiments/merge.py: each method against a NumPy reference of its formula, written independently here in float64,
on random params written as workdirs; the merged workdir loads and runs; bad input exits 2 with one line."""

from __future__ import annotations

import dataclasses
import pathlib
import zlib

import jax
import numpy as np
import pytest

from data.tokenizer import ByteTokenizer
from experiments import merge
from tests.conftest import tiny_run


def write_workdir(directory: pathlib.Path, run, params) -> None:
    from training.checkpoint import Checkpointer, checkpoints_dir, meta_for
    from training.config import CheckpointConfig

    checkpointer = Checkpointer(checkpoints_dir(directory), CheckpointConfig(async_save=False))
    try:
        checkpointer.save(0, {"params": params}, {"step": 0}, meta_for(run, ByteTokenizer()))
        checkpointer.wait()
    finally:
        checkpointer.close()


def tiny(**model):
    from training.config import with_vocab

    return with_vocab(tiny_run(model=model), ByteTokenizer().vocab_size)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory) -> dict[str, tuple[pathlib.Path, dict]]:
    """name -> (workdir, params as float64 NumPy): a base, three fine-tunes of it (base + noise), `twice` (2 x m1:
    parallel to m1) and `wide` (another d_ff)."""
    from training.checkpoint import abstract_params

    root = tmp_path_factory.mktemp("merge")
    run = tiny()
    shapes = abstract_params(run.model)
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    trees = {"base": base}
    for i in (1, 2, 3):
        trees[f"m{i}"] = jax.tree.map(lambda b: b + rng.normal(scale=0.1, size=b.shape).astype(np.float32), base)
    trees["twice"] = jax.tree.map(lambda m: 2 * m, trees["m1"])
    out = {}
    for name, tree in trees.items():
        write_workdir(root / name, run, tree)
        out[name] = (root / name, jax.tree.map(lambda x: np.asarray(x, np.float64), tree))
    long = dataclasses.replace(run, model=dataclasses.replace(run.model, max_seq_len=4 * run.model.max_seq_len))
    write_workdir(root / "long", long, trees["m2"])  # m2 fine-tuned at a longer data.seq_len (RoPE: same arrays)
    out["long"] = (root / "long", out["m2"][1])
    wide = tiny(d_ff=96)
    wide_params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract_params(wide.model))
    write_workdir(root / "wide", wide, wide_params)
    out["wide"] = (root / "wide", None)
    return out


# ---------------------------------------------------------------- the references, one tensor at a time, float64


def ref_linear(ws, xs, **_):
    return sum(w * x for w, x in zip(ws, xs)) / sum(ws)


def ref_slerp(ws, xs, **_):
    t = ws[1] / sum(ws)
    a, b = xs
    cos = a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = np.arccos(cos)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


def ref_trim(tau, density):
    k = max(1, int(density * tau.size))
    kept = np.zeros(tau.size, bool)
    kept[np.argsort(-np.abs(tau.ravel()), kind="stable")[:k]] = True  # exactly the top k (random floats: no ties)
    return np.where(kept.reshape(tau.shape), tau, 0)


def ref_drop(tau, density, seed, i, path):
    keep = np.random.default_rng([seed, i, zlib.crc32(path.encode())]).random(tau.shape, dtype=np.float32) < density
    return np.where(keep, tau / density, 0)


def ref_disjoint(ws, taus):
    ws = np.asarray(ws).reshape(-1, *[1] * taus[0].ndim)
    taus = np.stack(taus)
    sign = np.where((ws * taus).sum(0) >= 0, 1, -1)  # by mass
    agree = np.sign(taus) == sign
    weight = (ws * agree).sum(0)
    return (ws * taus * agree).sum(0) / np.where(weight == 0, 1, weight)


def ref_ties(ws, xs, base, density, **_):
    return base + ref_disjoint(ws, [ref_trim(x - base, density) for x in xs])


def ref_dare_ties(ws, xs, base, density, seed, path):
    return base + ref_disjoint(ws, [ref_drop(x - base, density, seed, i, path) for i, x in enumerate(xs)])


def ref_dare_linear(ws, xs, base, density, seed, path):
    return base + sum(w * ref_drop(x - base, density, seed, i, path) for i, (w, x) in enumerate(zip(ws, xs))) / sum(ws)


REFERENCES = {
    "linear": ref_linear,
    "slerp": ref_slerp,
    "ties": ref_ties,
    "dare_ties": ref_dare_ties,
    "dare_linear": ref_dare_linear,
}
assert set(REFERENCES) == set(merge.METHODS)


def run_merge(argv: list[str]) -> None:
    merge.main([str(a) for a in argv])


def merged_params(out: pathlib.Path):
    from training.checkpoint import load_for_inference

    run, params, tokenizer, step = load_for_inference(out)
    return run, params


CASES = [
    ("linear", ["m1", "m2", "m3"], [1.0, 2.0, 0.5], None, 1.0),
    ("slerp", ["m1", "m2"], [1.0, 3.0], None, 1.0),
    ("slerp", ["m1", "twice"], [1.0, 1.0], None, 1.0),  # parallel: the linear fallback
    ("ties", ["m1", "m2", "m3"], [1.0, 0.5, 2.0], "base", 0.3),
    ("dare_ties", ["m1", "m2", "m3"], [1.0, 0.5, 2.0], "base", 0.4),
    ("dare_linear", ["m1", "m2"], [1.0, 2.0], "base", 0.5),
    ("ties", ["m1", "long"], [1.0, 1.0], "base", 0.3),  # another max_seq_len, the same arrays: merges
]


@pytest.mark.parametrize("method, models, weights, base, density", CASES)
def test_each_method_is_its_formula(workdirs, tmp_path, method, models, weights, base, density):
    argv = ["--method", method, "--models", *[workdirs[m][0] for m in models], "--weights", *weights]
    argv += ["--out", tmp_path / "out", "--seed", 7]
    if base:
        argv += ["--base", workdirs[base][0], "--density", density]
    run_merge(argv)
    _, got = merged_params(tmp_path / "out")
    xs = [workdirs[m][1] for m in models]
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    assert len(flat_got) == len(jax.tree.leaves(xs[0]))
    for keys, leaf in flat_got:
        path = "params/" + ".".join(str(k.key) for k in keys)
        pick = lambda tree, keys=keys: _get(tree, keys)  # noqa: E731
        want = REFERENCES[method](
            weights,
            [pick(x) for x in xs],
            base=pick(workdirs["base"][1]),
            density=density,
            seed=7,
            path=path,
        )
        np.testing.assert_allclose(np.asarray(leaf), want, rtol=2e-5, atol=2e-6, err_msg=f"{method} {path}")


def _get(tree, keys):
    for k in keys:
        tree = tree[k.key]
    return tree


def test_merged_workdir_runs_and_records_its_recipe(workdirs, tmp_path):
    """The merged workdir is a plain workdir: it loads, a forward pass gives finite logits, the recipe is kept."""
    import orbax.checkpoint as ocp

    from model import Transformer

    out = tmp_path / "out"
    run_merge(["--method", "linear", "--models", workdirs["m1"][0], workdirs["m2"][0], "--out", out])
    run, params = merged_params(out)
    logits = Transformer(run.model).apply({"params": params}, np.arange(8, dtype=np.int32)[None])
    assert logits.shape == (1, 8, run.model.vocab_size) and np.isfinite(np.asarray(logits)).all()
    train = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(out / "checkpoints" / "0" / "train")
    assert train["merged"]["method"] == "linear" and train["merged"]["models"][1]["weight"] == 1.0
    assert not (out / "merge-scratch").exists() and not out.with_name("out.partial").exists()


def test_slerp_is_spherical_where_the_vectors_are_not_parallel():
    a, b = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    mid = merge.slerp_vectors(0.5, a.copy(), b.copy())
    np.testing.assert_allclose(mid, [np.sqrt(0.5)] * 2, rtol=1e-6)  # on the unit circle, not at (0.5, 0.5)
    near = np.array([1.0, 1e-3], np.float32)  # cos > 0.9995: linear
    np.testing.assert_allclose(merge.slerp_vectors(0.25, a.copy(), near.copy()), 0.75 * a + 0.25 * near, rtol=1e-6)


def tiny_leaf(xs, base):
    xs = [np.asarray(x, np.float32) for x in xs]
    return merge.Leaf("params/w", len(xs), lambda i: xs[i].copy(), lambda: np.asarray(base, np.float32).copy())


def test_ties_trims_small_entries_elects_by_mass_and_averages_the_agreeing():
    # density 0.5 keeps each model's two largest magnitudes. Entry 0: +1 against two -0.1s, the mass is + and the
    # count -; entry 1: two agree, the third's 0.01 is trimmed; entry 3: one model alone.
    xs = [[1.0, 0.5, 0.0, 0.0], [-0.1, 0.3, 0.0, 0.0], [-0.1, 0.01, 0.0, 0.2]]
    got = merge.ties(tiny_leaf(xs, np.zeros(4)), merge.Recipe("ties", (1.0, 1.0, 1.0), density=0.5))
    np.testing.assert_allclose(got, [1.0, 0.4, 0.0, 0.2], rtol=1e-6)


def test_dare_is_reproducible_and_keeps_the_mean():
    tau = np.ones(200_000, np.float32)
    once = merge.drop(tau.copy(), 0.3, seed=1, model=0, path="params/w")
    assert np.array_equal(once, merge.drop(tau.copy(), 0.3, seed=1, model=0, path="params/w"))
    assert not np.array_equal(once, merge.drop(tau.copy(), 0.3, seed=2, model=0, path="params/w"))
    assert not np.array_equal(once, merge.drop(tau.copy(), 0.3, seed=1, model=1, path="params/w"))
    assert set(np.unique(once)) == {0.0, np.float32(1 / 0.3)}
    assert abs(once.mean() - 1.0) < 0.02 and abs((once > 0).mean() - 0.3) < 0.01


def fails(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        run_merge(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "args, want",
    [
        (["--method", "median", "--models", "m1", "m2"], "--method='median': one of linear"),
        (["--method", "linear", "--models", "m1", "m2", "--weights", "1"], "--weights: 1 given for 2 models"),
        (["--method", "linear", "--models", "m1", "m2", "--weights", "1", "-1"], "each >= 0"),
        (["--method", "ties", "--models", "m1", "m2", "--base", "base", "--density", "0"], "--density=0.0: in (0, 1]"),
        (["--method", "dare_ties", "--models", "m1", "--base", "base", "--density", "1.5"], "--density=1.5"),
        (["--method", "ties", "--models", "m1", "m2"], "--method=ties: needs --base"),
        (["--method", "dare_linear", "--models", "m1", "m2"], "--method=dare_linear: needs --base"),
        (["--method", "slerp", "--models", "m1", "m2", "m3"], "--method=slerp: exactly two models (3 given)"),
        (["--method", "linear", "--models", "m1", "m2", "--base", "base"], "--base: only ties"),
        (["--method", "linear", "--models", "m1", "nowhere"], "nowhere: no such directory"),
        (["--method", "linear", "--models", "m1", "plain"], "plain: no checkpoints"),
        (["--method", "linear", "--models", "m1", "wide"], "wide: model.d_ff=96, but 64 in"),
        (["--method", "ties", "--models", "m1", "m2", "--base", "wide"], "wide: model.d_ff=96, but 64 in"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(workdirs, tmp_path, capsys, args, want):
    (tmp_path / "plain").mkdir()
    names = {name: str(path) for name, (path, _) in workdirs.items()} | {
        "nowhere": str(tmp_path / "nowhere"),
        "plain": str(tmp_path / "plain"),
    }
    argv = [names.get(a, a) for a in args] + ["--out", tmp_path / "out"]
    err = fails(capsys, argv)
    assert want in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_an_existing_out_is_kept_without_overwrite(workdirs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    models = [workdirs["m1"][0], workdirs["m2"][0]]
    assert "exists (pass --overwrite" in fails(capsys, ["--method", "linear", "--models", *models, "--out", out])
    assert (out / "keep.txt").read_text() == "mine"
    assert "would replace the input" in fails(
        capsys, ["--method", "linear", "--models", *models, "--out", models[0], "--overwrite"]
    )
    run_merge(["--method", "linear", "--models", *models, "--out", out, "--overwrite"])
    assert not (out / "keep.txt").exists() and (out / "checkpoints" / "0").is_dir()
