"""The lm-evaluation-harness adapter: our models as an lm-eval `LM`, and running lm-eval tasks on them.

`JaxLM` implements lm-eval's three request types on `sampling.scoring.Scorer` (batched, one prefill per shared
context). It tokenizes as lm-eval's `hf` model does on our exported checkpoints (training/hf.py `export`): text is
encoded without special tokens, an empty context is the prefix token (the token a document follows: our
end-of-document token, or a tokenizer's BOS), rolling windows are lm-eval's, and a context longer than the model's
window loses tokens from the left. So per-document log-likelihoods equal the `hf` model's on the export
(tests/test_harness.py), and numbers compare with any other model run through lm-eval.

    results = evaluate(JaxLM(scorer), ["stdlib_mc", "stdlib_ppl"], limit=50)
    results["results"]["stdlib_mc"]["acc,none"]
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import pathlib
from collections.abc import Sequence

from lm_eval.api.model import TemplateLM

from sampling.scoring import GenerateRequest, Scorer

TASKS_DIR = pathlib.Path(__file__).resolve().parent / "eval_tasks"  # our local tasks, always on the include path


class EvalError(ValueError):
    """A task list, include path or option that cannot be evaluated (a one-line message)."""


class JaxLM(TemplateLM):
    """lm-eval's `LM` over a Scorer. `add_bos_token` (as the `hf` model's option): every context starts with the
    tokens a document starts with (default: not, as the `hf` model does not)."""

    def __init__(self, scorer: Scorer, add_bos_token: bool = False, seed: int = 0, progress: bool = True):
        super().__init__()
        self.scorer, self.add_bos_token, self.seed, self.progress = scorer, add_bos_token, seed, progress
        self.vocab = scorer.tokenizer
        self.generated = 0  # generate_until requests answered (each samples from its own row's stream)

    @property
    def eot_token_id(self) -> int:
        return self.vocab.eod_id

    @property
    def prefix_token_id(self) -> int:
        return self.vocab.document_start[0]

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def tokenizer_name(self) -> str:
        return self.vocab.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.vocab.encode(string)
        if add_special_tokens or (add_special_tokens is None and self.add_bos_token):
            ids = [*self.vocab.document_start, *ids]
        return ids

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scores = self.scorer.loglikelihood([(ctx, cont) for _, ctx, cont in requests])
        for (pair, _, _), score in zip(requests, scores):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, score)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        scores = self.scorer.loglikelihood_rolling([self.tok_encode(t) for t in texts], self.prefix_token_id)
        for text, score in zip(texts, scores):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), score)
        return scores

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        asks = [self._generate_request(*req.args) for req in requests]
        texts = self.scorer.generate(asks, seed=self.seed + self.generated)
        self.generated += len(asks)
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    def _generate_request(self, context: str, gen_kwargs: dict) -> GenerateRequest:
        """A GenerateRequest as the `hf` model reads lm-eval's generation kwargs: `until` (a string or a list),
        `max_gen_toks` (default 256), `do_sample` (default: whether a temperature > 0 was given), `temperature`
        (1.0 when sampling without one), `top_k`, `top_p`."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        eos_text = self.vocab.decode([self.eot_token_id])
        until = tuple(u for u in until if u and u != eos_text)  # the end-of-document token stops every row
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        do_sample = kw.pop("do_sample", None)
        do_sample = temperature > 0 if do_sample is None else bool(do_sample)
        temperature = (temperature or 1.0) if do_sample else 0.0
        ids = self.tok_encode(context) or [self.prefix_token_id]
        return GenerateRequest(
            context=ids,
            until=until,
            max_new_tokens=int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", 256))),
            temperature=temperature,
            top_k=int(kw.pop("top_k", 0) or 0) if do_sample else 0,
            top_p=float(kw.pop("top_p", 1.0) or 1.0) if do_sample else 1.0,
        )


def task_manager(include_path: str | None = None, tasks: Sequence[str] = ()):
    """lm-eval's TaskManager over our tasks (experiments/eval_tasks/) and `include_path`; lm-eval's own tasks too
    unless every name in `tasks` is local (indexing lm-eval's ~15k tasks takes seconds, once per process)."""
    paths = (str(TASKS_DIR), *([str(pathlib.Path(include_path).expanduser().absolute())] if include_path else []))
    local = _manager(paths, False)
    if tasks and all(local.match_tasks([t]) for t in tasks):
        return local
    return _manager(paths, True)


@functools.cache
def _manager(paths: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    with quiet_lm_eval():
        return TaskManager(include_path=list(paths), include_defaults=defaults, verbosity="ERROR")


def check_include_path(include_path: str) -> None:
    """EvalError unless `include_path` is a directory holding task YAML files."""
    path = pathlib.Path(include_path).expanduser()
    if not path.is_dir():
        raise EvalError(f"--include_path={include_path!r}: no such directory")
    if not any(path.rglob("*.yaml")):
        raise EvalError(f"--include_path={include_path!r}: holds no task YAML files (*.yaml)")


def resolve_tasks(tasks: Sequence[str], manager) -> list[str]:
    """`tasks` as lm-eval names them (globs expanded); EvalError naming the first unknown one."""
    if not tasks:
        raise EvalError("--tasks: name at least one task")
    out = []
    for name in tasks:
        matched = manager.match_tasks([name])
        if not matched:
            raise EvalError(
                f"--tasks: unknown task {name!r} (not in lm-eval's tasks, experiments/eval_tasks/ or --include_path)"
            )
        out += [m for m in matched if m not in out]
    return out


def build_tasks(tasks: Sequence[str], manager) -> dict:
    """lm-eval's task dict, built task by task so that one whose data cannot be had (a download this machine
    cannot make) is an EvalError naming it."""
    from lm_eval.tasks import get_task_dict

    built = {}
    for name in tasks:
        try:
            with quiet_lm_eval():
                built |= get_task_dict([name], manager)
        except Exception as e:  # datasets raises many kinds (ConnectionError, FileNotFoundError, its own)
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EvalError(f"task {name!r}: cannot load its data ({type(e).__name__}: {why[:300]})") from None
    return built


@contextlib.contextmanager
def quiet_lm_eval():
    """lm-eval and datasets at warnings-off: their per-task notices (default aggregations, dataset builds) would
    bury the results table and the training log. lm-eval's bootstrap of non-mean metrics' stderr runs in this
    process (DISABLE_MULTIPROC): its default forks a pool, and a forked JAX process can deadlock."""
    import datasets

    os.environ.setdefault("DISABLE_MULTIPROC", "1")

    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, datasets.utils.logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()


@dataclasses.dataclass
class Options:
    limit: int | None = None
    num_fewshot: int | None = None
    log_samples: bool = False
    bootstrap_iters: int = 1000
    seed: int = 0


def evaluate(lm: JaxLM, tasks: Sequence[str], include_path: str | None = None, options: Options | None = None) -> dict:
    """lm-eval's results dict (`results`, `configs`, `n-samples`, ... and, with log_samples, `samples`) of `tasks`
    run on `lm`, plus `truncated`: requests whose context lost tokens from the left."""
    from lm_eval import evaluator

    options = options or Options()
    manager = task_manager(include_path, tasks)
    names = resolve_tasks(tasks, manager)
    build_tasks(names, manager)  # a task whose data cannot be had fails here, naming it
    before = lm.scorer.truncated
    with quiet_lm_eval():
        results = evaluator.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=options.num_fewshot,
            limit=options.limit,
            log_samples=options.log_samples,
            bootstrap_iters=options.bootstrap_iters,
            task_manager=manager,
            random_seed=options.seed,
            numpy_random_seed=options.seed,
            torch_random_seed=options.seed,
            fewshot_random_seed=options.seed,
            confirm_run_unsafe_code=True,  # pass@k tasks run generated code, in experiments/passk.py's sandbox
            verbosity="ERROR",
        )
    results["truncated"] = lm.scorer.truncated - before
    return results


# ------------------------------------------------------------------------------------------------ training


def check_training_tasks(tasks: Sequence[str]) -> list[str]:
    """train.eval_tasks as lm-eval names them; EvalError (one line) for an unknown one or one whose data cannot
    be had, before the train step compiles."""
    manager = task_manager(None, tasks)
    names = resolve_tasks(tasks, manager)
    build_tasks(names, manager)
    return names


def downstream(cfg, weights, tokenizer, tasks: Sequence[str], limit: int = 0, batch_size: int = 32) -> dict:
    """`tasks` run on in-memory weights (params, or {"params", "state"}), every document's scores kept:
    what the training loop logs (`training_metrics`) and writes (`per_document`)."""
    scorer = Scorer(cfg, weights, tokenizer, batch_size=batch_size)
    return evaluate(
        JaxLM(scorer, progress=False), tasks, options=Options(limit=limit or None, log_samples=True, bootstrap_iters=0)
    )


def metric_names(results: dict, task: str) -> dict[str, tuple[str, str]]:
    """Our name for each metric of `task` in lm-eval's results -> (lm-eval's metric, its filter): the metric, or
    'metric,filter' for filters other than 'none'."""
    out = {}
    for key in results["results"].get(task, {}):
        metric, sep, filt = key.partition(",")
        if sep and not metric.endswith("_stderr"):
            out[metric if filt == "none" else key] = (metric, filt)
    return out


def training_metrics(results: dict) -> dict[str, float]:
    """eval/<task>/<metric> of every numeric metric lm-eval reports."""
    out = {}
    for task in results["results"]:
        for name, (metric, filt) in metric_names(results, task).items():
            value = results["results"][task][f"{metric},{filt}"]
            if isinstance(value, int | float):
                out[f"eval/{task}/{name}"] = float(value)
    return out


def aggregation(results: dict, task: str, metric: str) -> str:
    """The name of how lm-eval aggregates `metric` of `task` over documents: the task's own (its metric_list), else
    lm-eval's default for the metric ('mean', 'perplexity', 'bits_per_byte', ...)."""
    from lm_eval.api.registry import get_metric_aggregation

    for entry in results.get("configs", {}).get(task, {}).get("metric_list", []):
        if entry.get("metric") == metric and entry.get("aggregation"):
            return str(getattr(entry["aggregation"], "__name__", entry["aggregation"]))
    try:
        default = get_metric_aggregation(metric)
    except Exception:  # a metric lm-eval's registry does not know (a task's own function)
        return "mean"
    return getattr(default, "__name__", "mean")


def per_document(results: dict) -> dict:
    """task -> metric -> {doc_id: score} for metrics that are means over documents (acc, exact_match, pass@k, ...),
    or the task's aggregate (a float) for the others (perplexities, bits per byte), whose per-document values are
    not scores. A perplexity's per-document values (each document's target log-likelihood) are kept as the metric
    'loglikelihood', which is a mean: a paired comparison can use them."""
    out = {}
    for task, samples in results.get("samples", {}).items():
        out[task] = {}
        for name, (metric, filt) in metric_names(results, task).items():
            docs = {
                str(s["doc_id"]): float(s[metric])
                for s in samples
                if s.get("filter") == filt and isinstance(s.get(metric), int | float)
            }
            how = aggregation(results, task, metric)
            out[task][name] = docs if docs and how == "mean" else results["results"][task][f"{metric},{filt}"]
            if docs and how == "perplexity":
                out[task]["loglikelihood" if filt == "none" else f"loglikelihood,{filt}"] = docs
    return out
