"""Model merging: several workdirs of one architecture merged, tensor by tensor, into a new workdir.

    python -m experiments.merge --method linear --models runs/a runs/b --weights 0.7 0.3 --out runs/ab
    python -m experiments.merge --method slerp --models runs/a runs/b --weights 1 1 --out runs/ab-slerp
    python -m experiments.merge --method ties --models runs/a runs/b --base runs/pre --density 0.2 --out runs/ab-ties
    python -m experiments.merge --method dare_ties --models runs/a runs/b --base runs/pre --density 0.5 --seed 1 --out o

OUT is a plain workdir (one checkpoint, step 0, with the first model's config and the shared tokenizer): infer.py,
`python -m experiments.evaluate` and `python -m model.hf export` load it like any other. The recipe (method,
inputs with their steps, weights, base, density, seed) is recorded in the checkpoint's `train` item as `merged`.
Each W is a workdir, its checkpoints directory or one step directory (default: its latest complete step).

The methods, as mergekit defines them (the papers' formulas, weights normalized as mergekit's `normalize: true`).
Weights (default all 1) must be >= 0 with a positive sum. tau_i = W_i - W_base is model i's task vector.
- linear: sum_i w_i W_i / sum_i w_i.
- slerp: exactly two models, t = w2 / (w1 + w2); per tensor, on the flattened vectors, with cos = the cosine of
  their angle theta: sin((1-t) theta)/sin(theta) W_1 + sin(t theta)/sin(theta) W_2; linear interpolation
  (1-t) W_1 + t W_2 instead where |cos| > 0.9995 (mergekit's DOT_THRESHOLD) or either vector is zero.
- ties (Yadav et al. 2023): trim each tau_i to its top `density` fraction by magnitude (entries with |tau| >= the
  k-th largest |tau| of the tensor, k = max(1, floor(density n)); ties at that magnitude all stay), elect each
  entry's sign as the sign of sum_i w_i trim(tau_i) (its mass; + where the sum is 0), and take the disjoint mean
  sum_i w_i trim(tau_i) [agrees_i] / sum_i w_i [agrees_i] over the models whose trimmed entry is nonzero with the
  elected sign (0 where none agrees); OUT = W_base + that mean.
- dare_linear (Yu et al. 2023): drop(tau_i) keeps each entry with probability `density` and scales the kept ones
  by 1/density (so E[drop(tau)] = tau); OUT = W_base + sum_i w_i drop(tau_i) / sum_i w_i.
- dare_ties: drop(tau_i) in place of TIES' trim, then TIES' sign election and disjoint mean.
DARE's masks are reproducible: model i's mask of a tensor comes from NumPy's generator seeded with (--seed, i,
crc32 of the tensor's path, e.g. 'params/layers.mlp.up.kernel'), so one recipe always gives the same weights.

Memory: one leaf (parameter array) at a time, read on its own from each checkpoint (orbax partial restore), and
never more than two checkpoints' arrays of that leaf at once. Counted in float32 arrays of the leaf's size, besides
short-lived temporaries of that size (an np.abs, a product before it is added):
- linear: 2 (one model's array, the running sum);
- slerp: 2 (the two models' arrays);
- dare_linear: 4 (the base's array, one model's, the running sum, the drop mask's uniform draws);
- ties, dare_ties: 5 (the base's array and one model's, the elected signs, the weighted sum, the weight sum), plus
  2 while trimming (the magnitudes and their partition) or 1 while dropping. They make two passes over the models:
  the first sums the weighted sparsified task vectors to elect the signs, the second recomputes each (trim and
  drop are deterministic) and adds its agreeing entries; so each model's array is read twice rather than all k
  task vectors held at once.
Each merged leaf goes to a file-backed .npy in OUT's staging directory as soon as it is done, and orbax writes the
checkpoint from those files at the end (its copy of host arrays turned off), so the merged model is not held in
the process's heap either (the OS may keep those files' pages cached).
Bad input prints one line and exits with code 2 before anything is written; OUT is
replaced only once the new one is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import pathlib
import sys
import zlib
from collections.abc import Callable, Iterator

import numpy as np

SLERP_DOT_THRESHOLD = 0.9995  # mergekit's: above it the two directions are treated as parallel
ITEMS = ("params", "model_state")  # the array items load_for_inference reads


class MergeError(ValueError):
    """Inputs that cannot be merged (bad arguments, or models of different architectures)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    method: str
    weights: tuple[float, ...]
    density: float = 1.0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter array of every input: `read(i)` reads model i's from its checkpoint as float32 (a fresh array
    on each call), `read_base()` the base's."""

    path: str  # 'params/layers.mlp.up.kernel'
    count: int
    read: Callable[[int], np.ndarray]
    read_base: Callable[[], np.ndarray]


# ---------------------------------------------------------------- the methods: one function per key, over one leaf


def normalized(weights: tuple[float, ...]) -> list[float]:
    total = sum(weights)
    return [w / total for w in weights]


def linear(leaf: Leaf, recipe: Recipe) -> np.ndarray:
    total = None
    for i, w in enumerate(normalized(recipe.weights)):
        x = leaf.read(i)
        x *= w
        total = x if total is None else np.add(total, x, out=total)
    return total


def slerp_vectors(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spherical interpolation from a (t=0) to b (t=1) of two flattened tensors; linear where nearly parallel."""
    norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cos = float(np.dot(a.ravel(), b.ravel())) / (norm_a * norm_b) if norm_a and norm_b else 1.0
    if abs(cos) > SLERP_DOT_THRESHOLD:
        s_a, s_b = 1.0 - t, t
    else:
        theta = np.arccos(cos)
        s_a, s_b = np.sin((1.0 - t) * theta) / np.sin(theta), np.sin(t * theta) / np.sin(theta)
    a *= np.float32(s_a)
    b *= np.float32(s_b)
    return np.add(a, b, out=a)


def slerp(leaf: Leaf, recipe: Recipe) -> np.ndarray:
    w1, w2 = recipe.weights
    return slerp_vectors(w2 / (w1 + w2), leaf.read(0), leaf.read(1))


def trim(tau: np.ndarray, density: float) -> np.ndarray:
    """TIES' trim, in place: zeros every entry below the top `density` fraction of magnitudes."""
    if density >= 1.0:
        return tau
    magnitude = np.abs(tau).ravel()
    k = max(1, int(density * magnitude.size))
    threshold = np.partition(magnitude, magnitude.size - k)[magnitude.size - k]
    del magnitude
    tau[np.abs(tau) < threshold] = 0
    return tau


def drop(tau: np.ndarray, density: float, seed: int, model: int, path: str) -> np.ndarray:
    """DARE's drop and rescale, in place: keeps each entry with probability `density`, divided by it."""
    rng = np.random.default_rng([seed, model, zlib.crc32(path.encode())])
    keep = rng.random(tau.shape, dtype=np.float32) < density
    tau *= np.float32(1.0 / density)
    tau[~keep] = 0
    return tau


def task_vector(leaf: Leaf, i: int, base: np.ndarray) -> np.ndarray:
    x = leaf.read(i)
    return np.subtract(x, base, out=x)


def dare_linear(leaf: Leaf, recipe: Recipe) -> np.ndarray:
    base = leaf.read_base()
    total = np.zeros_like(base)
    for i, w in enumerate(normalized(recipe.weights)):
        tau = drop(task_vector(leaf, i, base), recipe.density, recipe.seed, i, leaf.path)
        tau *= np.float32(w)
        total += tau
    return np.add(base, total, out=base)


def disjoint_merge(leaf: Leaf, recipe: Recipe, sparsify: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """TIES' sign election and disjoint mean over the sparsified task vectors, in two passes over the models."""
    base = leaf.read_base()
    sign = np.zeros_like(base)
    for i, w in enumerate(recipe.weights):  # the mass of each sign: sum_i w_i sparse(tau_i)
        tau = sparsify(task_vector(leaf, i, base), i)
        tau *= np.float32(w)
        sign += tau
    sign = np.where(sign >= 0, np.float32(1), np.float32(-1))
    total, weight = np.zeros_like(base), np.zeros_like(base)
    for i, w in enumerate(recipe.weights):
        tau = sparsify(task_vector(leaf, i, base), i)
        agrees = np.sign(tau) == sign  # a dropped (zero) entry agrees with neither sign
        tau[~agrees] = 0
        tau *= np.float32(w)
        total += tau
        weight += agrees * np.float32(w)
    weight[weight == 0] = 1  # no model agrees: total is 0 there
    total /= weight
    return np.add(base, total, out=base)


def ties(leaf: Leaf, recipe: Recipe) -> np.ndarray:
    return disjoint_merge(leaf, recipe, lambda tau, i: trim(tau, recipe.density))


def dare_ties(leaf: Leaf, recipe: Recipe) -> np.ndarray:
    return disjoint_merge(leaf, recipe, lambda tau, i: drop(tau, recipe.density, recipe.seed, i, leaf.path))


METHODS: dict[str, Callable[[Leaf, Recipe], np.ndarray]] = {
    "linear": linear,
    "slerp": slerp,
    "ties": ties,
    "dare_ties": dare_ties,
    "dare_linear": dare_linear,
}
WITH_BASE = ("ties", "dare_ties", "dare_linear")


def check_recipe(recipe: Recipe, models: int, base: bool) -> None:
    """MergeError naming the first bad argument."""
    if recipe.method not in METHODS:
        raise MergeError(f"--method={recipe.method!r}: one of {', '.join(METHODS)}")
    if len(recipe.weights) != models:
        raise MergeError(f"--weights: {len(recipe.weights)} given for {models} models (one per model)")
    if any(not np.isfinite(w) or w < 0 for w in recipe.weights) or sum(recipe.weights) <= 0:
        raise MergeError(f"--weights={list(recipe.weights)}: each >= 0, with a positive sum")
    if not 0 < recipe.density <= 1:
        raise MergeError(f"--density={recipe.density}: in (0, 1]")
    if recipe.method == "slerp" and models != 2:
        raise MergeError(f"--method=slerp: exactly two models ({models} given)")
    if recipe.method in WITH_BASE and not base:
        raise MergeError(f"--method={recipe.method}: needs --base (the model the task vectors are taken from)")
    if recipe.method not in WITH_BASE and base:
        raise MergeError(f"--base: only {', '.join(WITH_BASE)} use one (--method={recipe.method})")


# ---------------------------------------------------------------- reading and writing checkpoints leaf by leaf


@dataclasses.dataclass
class Source:
    """One input checkpoint: its step directory, config, tokenizer and the shapes of its arrays."""

    name: str  # as given on the command line
    step_dir: pathlib.Path
    meta: dict
    arrays: dict[str, tuple[tuple, np.dtype]]  # 'params/layers.mlp.up.kernel' -> (shape, dtype)

    def read(self, path: str) -> np.ndarray:
        """One array, read on its own, as float32."""
        import orbax.checkpoint as ocp

        item, dotted = path.split("/", 1)
        keys = dotted.split(".")
        target: dict = {}
        node = target
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
        with quiet_orbax():
            restored = ocp.PyTreeCheckpointer().restore(
                self.step_dir / item,
                args=ocp.args.PyTreeRestore(item=target, restore_args=target, partial_restore=True),
            )
        for key in keys:
            restored = restored[key]
        return np.asarray(restored, dtype=np.float32)


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
    """Orbax warns on every single-item read that the item has no _CHECKPOINT_METADATA of its own."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def open_source(name: str) -> Source:
    """The newest complete step (or the step directory given) of a workdir; CheckpointError if there is none."""
    import jax
    import orbax.checkpoint as ocp

    from training.checkpoint import Checkpointer, CheckpointError, locate, stored_config

    directory, step = locate(name)
    if step is None:
        checkpointer = Checkpointer(directory)
        try:
            steps = checkpointer.steps()
        finally:
            checkpointer.close()
        if not steps:
            raise CheckpointError(f"{name}: no checkpoints in {directory}")
        step = steps[-1]
    step_dir = directory / str(step)
    with quiet_orbax():
        try:
            meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta")
            run = stored_config(meta, step_dir)
            arrays = {}
            for item in ITEMS:
                if not (step_dir / item).is_dir():
                    continue
                tree = ocp.PyTreeCheckpointer().metadata(step_dir / item).item_metadata.tree
                for keys, info in jax.tree_util.tree_flatten_with_path(tree)[0]:
                    path = f"{item}/" + ".".join(str(k.key) for k in keys)
                    arrays[path] = (tuple(info.shape), np.dtype(info.dtype))
        except CheckpointError:
            raise
        except Exception as e:  # orbax and tensorstore raise many kinds for damaged files
            from training.checkpoint import damage

            raise CheckpointError(f"{name}: {step_dir} does not read back ({damage(e)})") from None
    if run.quant.scheme:
        raise CheckpointError(f"{name}: its weights are quantized ({run.quant.scheme}); merge their float sources")
    return Source(name, step_dir, meta, arrays)


# Model keys that change no weight but through a shape the array check below compares: the context length a run
# trained at (data.seq_len's; only learned positions have a table of that size), e.g. a fine-tune at a longer
# seq_len merged with its base.
SHAPE_ONLY = {"model.max_seq_len"}


def check_same_architecture(sources: list[Source]) -> None:
    """MergeError naming the first difference from the first input: a model config key (but SHAPE_ONLY's), the
    tokenizer, or an array's presence, shape or dtype."""
    from training.checkpoint import differences, stored_config

    first = sources[0]
    first_run = stored_config(first.meta, first.step_dir)
    for other in sources[1:]:
        for key, mine, theirs in differences(first_run, stored_config(other.meta, other.step_dir), ("model",)):
            if key in SHAPE_ONLY:
                continue
            raise MergeError(f"{other.name}: {key}={theirs!r}, but {mine!r} in {first.name}")
        if other.meta["tokenizer"] != first.meta["tokenizer"]:
            raise MergeError(f"{other.name}: its tokenizer differs from {first.name}'s")
        for path in sorted(first.arrays.keys() | other.arrays.keys()):
            if path not in other.arrays or path not in first.arrays:
                where, missing = (other, first) if path not in other.arrays else (first, other)
                raise MergeError(f"{where.name}: has no array {path} (which {missing.name} has)")
            (shape, dtype), (their_shape, their_dtype) = first.arrays[path], other.arrays[path]
            if shape != their_shape or dtype != their_dtype:
                raise MergeError(
                    f"{other.name}: {path} is {their_dtype}{list(their_shape)}, but {dtype}{list(shape)} in "
                    f"{first.name}"
                )
        if not all(np.issubdtype(dtype, np.floating) for _, dtype in first.arrays.values()):
            raise MergeError(f"{first.name}: holds non-float arrays (only float weights merge)")


def merge_leaves(models: list[Source], base: Source | None, recipe: Recipe, scratch: pathlib.Path) -> dict:
    """{item: tree of the merged arrays}, each written to a .npy under `scratch` as soon as it is merged and held as
    a read-only memory map of that file."""
    merge = METHODS[recipe.method]
    trees: dict = {}
    for n, (path, (shape, dtype)) in enumerate(sorted(models[0].arrays.items())):
        leaf = Leaf(
            path,
            len(models),
            read=lambda i, path=path: models[i].read(path),
            read_base=lambda path=path: base.read(path),
        )
        merged = merge(leaf, recipe)
        assert merged.shape == shape, (path, merged.shape, shape)
        out = np.lib.format.open_memmap(scratch / f"{n}.npy", mode="w+", dtype=dtype, shape=shape)
        out[...] = merged
        out.flush()
        del merged, out
        item, keys = path.split("/", 1)
        node = trees.setdefault(item, {})
        *parents, last = keys.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = np.load(scratch / f"{n}.npy", mmap_mode="r")
    return trees


@contextlib.contextmanager
def host_arrays_not_copied() -> Iterator[None]:
    """Orbax deep-copies every NumPy array it saves (against concurrent changes); the merged arrays are read-only
    memory maps, so the copy would only pull the whole merged model into memory."""
    import orbax.checkpoint as ocp

    previous = ocp.type_handlers.get_type_handler(np.ndarray)
    with quiet_orbax():  # it warns of each override
        ocp.type_handlers.register_type_handler(
            np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False), override=True
        )
    try:
        yield
    finally:
        with quiet_orbax():
            ocp.type_handlers.register_type_handler(np.ndarray, previous, override=True)


def write_merged(out: pathlib.Path, models: list[Source], base: Source | None, recipe: Recipe) -> None:
    """OUT's checkpoint step 0: the merged arrays, the first model's config and tokenizer, the recipe in `train`."""
    from training.checkpoint import Checkpointer, checkpoints_dir
    from training.config import CheckpointConfig

    scratch = out / "merge-scratch"
    scratch.mkdir(parents=True)
    trees = merge_leaves(models, base, recipe, scratch)
    merged = {
        "method": recipe.method,
        "models": [{"path": str(m.step_dir.absolute()), "weight": w} for m, w in zip(models, recipe.weights)],
        "base": None if base is None else str(base.step_dir.absolute()),
        "density": recipe.density,
        "seed": recipe.seed,
    }
    checkpointer = Checkpointer(checkpoints_dir(out), CheckpointConfig(async_save=False))
    try:
        with host_arrays_not_copied():
            checkpointer.save(0, trees, {"step": 0, "merged": merged}, models[0].meta)
            checkpointer.wait()
    finally:
        checkpointer.close()
    del trees
    for f in scratch.iterdir():
        f.unlink()
    scratch.rmdir()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.merge", description=__doc__.splitlines()[0])
    parser.add_argument("--method", required=True, help=" | ".join(METHODS))
    parser.add_argument("--models", nargs="+", required=True, help="the workdirs to merge")
    parser.add_argument("--weights", nargs="+", type=float, help="one per model (default: all 1); normalized")
    parser.add_argument("--base", help="ties, dare_*: the workdir the task vectors are taken from")
    parser.add_argument("--density", type=float, default=1.0, help="ties: fraction kept; dare_*: keep probability")
    parser.add_argument("--seed", type=int, default=0, help="dare_*: seeds the drop masks")
    parser.add_argument("--out", required=True, help="the merged workdir to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)

    def fail(message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    weights = tuple(args.weights) if args.weights is not None else (1.0,) * len(args.models)
    recipe = Recipe(args.method, weights, args.density, args.seed)
    try:
        check_recipe(recipe, len(args.models), args.base is not None)
    except MergeError as e:
        fail(str(e))
    out = pathlib.Path(args.out).expanduser().absolute()
    if out.exists() and not args.overwrite:
        fail(f"{args.out}: exists (pass --overwrite to replace it)")
    for name in [*args.models, *([args.base] if args.base else [])]:
        given = pathlib.Path(name).expanduser().absolute()
        if given == out or out in given.parents:
            fail(f"{args.out}: would replace the input {name}; write a new workdir")

    from training.checkpoint import CheckpointError
    from training.quantize import commit_dir, replace_dir

    try:
        models = [open_source(name) for name in args.models]
        base = open_source(args.base) if args.base else None
        check_same_architecture(models + ([base] if base else []))
    except (CheckpointError, MergeError) as e:
        fail(str(e))
    staging = replace_dir(out, args.overwrite)
    write_merged(staging, models, base, recipe)
    commit_dir(staging, out)
    print(f"wrote {args.out}: {recipe.method} of {len(models)} models", file=sys.stderr)


if __name__ == "__main__":
    main()
