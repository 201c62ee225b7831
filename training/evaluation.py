"""The loss and its evaluation: cross-entropy, a batch's model inputs, held-out loss / perplexity / bits per byte,
and scoring a text. The training loop and infer.py's --score both use it."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

import data as data_lib
from model import Output, Transformer
from model import heads as heads_lib
from model.mask import documents


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, z_loss: float = 0.0, label_smoothing: float = 0.0):
    """Per-token training loss and plain negative log-likelihood, both float32 [B, T]."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    nll_BT = log_z_BT - target_logit_BT
    loss_BT = nll_BT
    if label_smoothing > 0:
        uniform_BT = log_z_BT - jnp.mean(logits_BTV, axis=-1)  # cross-entropy against the uniform distribution
        loss_BT = (1 - label_smoothing) * nll_BT + label_smoothing * uniform_BT
    if z_loss > 0:
        loss_BT = loss_BT + z_loss * jnp.square(log_z_BT)
    return loss_BT, nll_BT


@dataclasses.dataclass(frozen=True, eq=False)
class Inputs:
    """How a batch of windows [B, T+1] becomes the model's inputs: `order_T` is ring attention's zig-zag layout
    (None: in order), `eod_id` the end-of-document token when attention stays inside documents (None: it doesn't).
    With `extra_tokens` (training with extra heads, model/heads.py) windows are [B, T+1+extra] and the model also
    gets each position's further targets (`ahead_BTA`); evaluation uses `for_eval()`, the main head only."""

    order_T: np.ndarray | None = None
    eod_id: int | None = None
    extra_tokens: int = 0

    def for_eval(self) -> Inputs:
        return dataclasses.replace(self, extra_tokens=0)

    def __call__(
        self, tokens_BT1: jax.Array, model: Transformer, variables: dict, segments_BT: jax.Array | None = None, **kw
    ) -> tuple[Output, jax.Array]:
        """(the model's output, targets), permuted alike when the layout is. `segments_BT` (a batch's segment_ids,
        one per input token) keeps attention inside segments, positions restarting at each, in place of the
        documents that `eod_id` finds."""
        ahead_BTA = None
        if self.extra_tokens:
            ahead_BTA = heads_lib.ahead(tokens_BT1, 1 + self.extra_tokens)
            tokens_BT1 = tokens_BT1[:, : -self.extra_tokens]
        inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
        positions_BT = None
        if segments_BT is not None:
            positions_BT = segment_positions(segments_BT)
        elif self.eod_id is not None:
            segments_BT, positions_BT = documents(inputs_BT, self.eod_id)
        if self.order_T is not None:
            if positions_BT is None:
                positions_BT = jnp.broadcast_to(jnp.arange(inputs_BT.shape[1]), inputs_BT.shape)
            inputs_BT, targets_BT, positions_BT = (x[:, self.order_T] for x in (inputs_BT, targets_BT, positions_BT))
            segments_BT = None if segments_BT is None else segments_BT[:, self.order_T]
            ahead_BTA = None if ahead_BTA is None else ahead_BTA[:, self.order_T]
        out = model.apply(
            variables,
            inputs_BT,
            positions_BT,
            segments_BT,
            in_order=self.order_T is None,
            **({"ahead_BTA": ahead_BTA} if ahead_BTA is not None else {}),
            method=Transformer.forward,
            **kw,
        )
        return out, targets_BT

    def permute(self, x_BT: jax.Array) -> jax.Array:
        return x_BT if self.order_T is None else x_BT[:, self.order_T]


def segment_positions(segments_BT: jax.Array) -> jax.Array:
    """Positions counting from 0 at each segment's first token (and at the window's), as `documents` gives them."""
    T = segments_BT.shape[1]
    starts_BT = jnp.concatenate(
        [jnp.zeros_like(segments_BT[:, :1], bool), segments_BT[:, 1:] != segments_BT[:, :-1]], axis=1
    )
    index_T = jnp.arange(T, dtype=jnp.int32)
    return index_T - jax.lax.cummax(jnp.where(starts_BT, index_T, 0), axis=1)


def variables_of(params, model_state=None) -> dict:
    return {"params": params, **({"state": model_state} if model_state else {})}


def make_eval_step(model: Transformer, token_bytes: np.ndarray, inputs: Inputs | None = None, per_window: bool = False):
    """A batch's summed loss (nats), scored tokens and their UTF-8 bytes; with `per_window`, also each window's
    (row's) sums as `nll_B` and `bytes_B`, for comparisons paired window by window (`window_scores`)."""
    inputs = (inputs or Inputs()).for_eval()
    bytes_V = jnp.asarray(token_bytes, jnp.float32)

    def eval_step(params, batch: dict, model_state=None) -> dict:
        variables = variables_of(params, model_state)
        out, targets_BT = inputs(batch["tokens"], model, variables, segments_BT=batch.get("segment_ids"))
        mask_BT = inputs.permute(batch["mask"])
        _, nll_BT = cross_entropy(out.logits_BTV, targets_BT)
        nll_B, bytes_B = jnp.sum(nll_BT * mask_BT, axis=1), jnp.sum(bytes_V[targets_BT] * mask_BT, axis=1)
        sums = {"nll": jnp.sum(nll_B), "tokens": jnp.sum(mask_BT), "bytes": jnp.sum(bytes_B)}
        return {**sums, "nll_B": nll_B, "bytes_B": bytes_B} if per_window else sums

    return eval_step


def evaluate(eval_step, params, batches: list[dict], model_state=None) -> dict:
    """Mean loss (nats/token), perplexity and bits per UTF-8 byte over `batches` ({'tokens', 'mask'}, and
    'segment_ids' where they are packed conversations)."""
    totals = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0}
    for batch in batches:
        out = jax.device_get(eval_step(params, batch, model_state))
        totals = {k: totals[k] + float(out[k]) for k in totals}
    loss = totals["nll"] / max(totals["tokens"], 1.0)
    return {
        "eval/loss": loss,
        "eval/ppl": math.exp(min(loss, 700.0)),
        "eval/bpb": totals["nll"] / math.log(2) / max(totals["bytes"], 1.0),
    }


def window_scores(eval_step, params, batches: list[dict], model_state=None) -> tuple[np.ndarray, np.ndarray]:
    """(nats, bytes) of each evaluation window, float64 [W] in batch order, from a `per_window` eval step;
    sum(nats) / ln 2 / sum(bytes) is `evaluate`'s eval/bpb."""
    outs = [jax.device_get(eval_step(params, batch, model_state)) for batch in batches]
    nll_W = np.concatenate([np.asarray(o["nll_B"], np.float64) for o in outs])
    return nll_W, np.concatenate([np.asarray(o["bytes_B"], np.float64) for o in outs])


def split_weights(weights) -> tuple:
    """(params, model_state or None) of params or of {"params", "state"} (training.checkpoint.load_for_inference)."""
    if isinstance(weights, dict) and "params" in weights:
        return weights["params"], weights.get("state")
    return weights, None


def score_text(
    model: Transformer, params, tokenizer, text: str, seq_len: int, batch_size: int, inputs: Inputs | None = None
) -> dict:
    """eval/loss, eval/ppl and eval/bpb of `text` as one document (end-of-document appended, as the
    token store does), every token scored once: what train.py's eval reports for the same text. `params` may be
    {"params", "state"}."""
    tokens = np.asarray(tokenizer.encode(text) + [tokenizer.eod_id], np.int32)
    eval_step = jax.jit(make_eval_step(model, tokenizer.token_bytes, inputs))
    params, model_state = split_weights(params)
    return evaluate(eval_step, params, data_lib.scoring_batches(tokens, seq_len, batch_size), model_state)


def score_file(run, params, tokenizer, text: str) -> dict:
    """eval/loss, eval/ppl, eval/bpb of `text` under a run's model, plus how many tokens were scored."""
    inputs = Inputs(eod_id=tokenizer.eod_id if run.data.document_mask else None)
    scores = score_text(Transformer(run.model), params, tokenizer, text, run.data.seq_len, run.train.batch_size, inputs)
    return {**scores, "tokens": len(tokenizer.encode(text)) + 1}
