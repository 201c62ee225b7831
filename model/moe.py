"""Sparse mixture of experts: the `model.mlp='moe'` kind, its config group `model.moe`, routers and dispatch.

A layer routes each token to `top_k` of `num_experts` SwiGLU experts (plus `num_shared_experts` always-on ones)
and sums their outputs weighted by the router's gates.

- Routers (`ROUTERS`): `softmax` (Switch, Mixtral: a float32 softmax over all experts, then the top k,
  renormalised when `norm_topk_prob`) and `sigmoid` (DeepSeek-V3: sigmoid scores; the experts kept are the top k
  inside the `topk_group` best of `n_group` groups, a group scored by the sum of its two best scores; gates
  renormalised when `norm_topk_prob`). Both multiply the gates by `routed_scaling`.
- Balancing: the Switch load-balancing loss `E * sum_i f_i P_i` (weight `aux_loss_weight`), the ST-MoE router
  z-loss `mean(logsumexp(logits)^2)` (weight `z_loss_weight`), and DeepSeek-V3's auxiliary-loss-free correction
  bias: non-trained state (the "state" collection) added to the scores for choosing experts only, never to the
  gates, moved after each train step by `bias_update_rate * sign(mean load - load)`. `router_noise`: Switch's
  multiplicative jitter of the router input, while training only (where the caller gives a "noise" rng).
- Dispatch (`DISPATCHES`) puts every kept (token, expert) assignment on a row of one grouped buffer, runs the
  experts there with a grouped matmul and gathers the rows back. `dropless`: rows grouped by expert, no
  assignment dropped; on CPU each expert's rows are padded to a whole number of tiles and a loop over tiles
  multiplies each by its expert's weights (XLA:CPU lowers `ragged_dot` densely, over every group), elsewhere
  `jax.lax.ragged_dot`. `capacity`: each expert has `ceil(capacity_factor * A / num_experts)` rows for the
  A = tokens * top_k assignments; the ones past it are dropped (the token's residual passes through), first
  choices before second ones, earlier tokens before later ones.
- Which layers are sparse: the first `first_dense_layers` are dense SwiGLU (`model.d_ff`), then every `every`-th
  layer is MoE and the others dense (`MoE.layer_kind`, what `ModelConfig.layer_specs` asks the MLP kind).

Terms logged (model.aux): moe_aux_loss (unweighted: 1.0 when balanced), moe_z_loss, moe_max_load (largest
expert's assignments / the mean) and moe_dropped_frac, each averaged over the MoE layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import weights
from model.aux import Aux
from model.layers import CALIBRATION, SwiGLU, hidden_std, observe, output_std
from model.runtime import TRAINING

normal = nn.initializers.normal

if TYPE_CHECKING:
    from model.config import ModelConfig
    from model.runtime import Runtime

NAME = "moe"  # its key in model.kinds.MLP_KINDS
DENSE = "swiglu"  # the kind of its dense layers
_KEY = "model.moe."


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    d_ff_expert: int = 0  # hidden width of each expert (0: model.d_ff)
    num_shared_experts: int = 0  # always-on experts of width d_ff_expert, added to the routed output
    first_dense_layers: int = 0  # dense SwiGLU layers before the first MoE one
    every: int = 1  # after those, layer i is MoE when (i - first_dense_layers) % every == 0, else dense
    router: str = "softmax"  # a key of ROUTERS
    norm_topk_prob: bool = True  # renormalise the kept gates to sum to 1
    routed_scaling: float = 1.0  # gates times this (DeepSeek-V3: 2.5)
    n_group: int = 1  # sigmoid: expert groups
    topk_group: int = 1  # sigmoid: groups a token may use
    aux_loss_weight: float = 0.01  # Switch load-balancing loss weight (0: logged only)
    z_loss_weight: float = 0.0  # router z-loss weight (0: logged only)
    router_noise: float = 0.0  # router input times U(1 - noise, 1 + noise) while training (0: off)
    bias_update_rate: float = 0.0  # auxiliary-loss-free balancing bias step per train step (0: off)
    capacity_factor: float = 1.25  # capacity: rows per expert = ceil(factor * assignments / num_experts)
    dispatch: str = "dropless"  # a key of DISPATCHES

    def sparse(self, layer: int) -> bool:
        return layer >= self.first_dense_layers and (layer - self.first_dense_layers) % self.every == 0

    def d_ff_of(self, cfg: ModelConfig) -> int:
        return self.d_ff_expert or cfg.d_ff


# ----------------------------------------------------------------------------------------------- routers


class Routing(NamedTuple):
    experts_TK: jax.Array  # int32: the experts each token goes to
    gates_TK: jax.Array  # float32: the weight of each of their outputs
    probs_TE: jax.Array  # float32: router probabilities (sum to 1 per token), the P of the balancing loss


def softmax_router(m: MoEConfig, logits_TE: jax.Array, bias_E: jax.Array) -> Routing:
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    _, experts_TK = jax.lax.top_k(probs_TE + bias_E, m.top_k)
    gates_TK = jnp.take_along_axis(probs_TE, experts_TK, axis=-1)
    if m.norm_topk_prob:
        gates_TK = gates_TK / jnp.sum(gates_TK, axis=-1, keepdims=True)
    return Routing(experts_TK, gates_TK * m.routed_scaling, probs_TE)


def sigmoid_router(m: MoEConfig, logits_TE: jax.Array, bias_E: jax.Array) -> Routing:
    scores_TE = jax.nn.sigmoid(logits_TE)
    choice_TE = scores_TE + bias_E
    if m.n_group > 1:
        T, E = choice_TE.shape
        choice_TGe = choice_TE.reshape(T, m.n_group, E // m.n_group)
        group_TG = jnp.sum(jax.lax.top_k(choice_TGe, min(2, E // m.n_group))[0], axis=-1)
        _, groups_TJ = jax.lax.top_k(group_TG, m.topk_group)
        keep_TG = jnp.sum(jax.nn.one_hot(groups_TJ, m.n_group, dtype=jnp.bool_), axis=1) > 0
        choice_TE = jnp.where(keep_TG[:, :, None], choice_TGe, -jnp.inf).reshape(T, E)
    _, experts_TK = jax.lax.top_k(choice_TE, m.top_k)
    gates_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
    if m.norm_topk_prob:
        gates_TK = gates_TK / (jnp.sum(gates_TK, axis=-1, keepdims=True) + 1e-20)
    probs_TE = scores_TE / jnp.sum(scores_TE, axis=-1, keepdims=True)
    return Routing(experts_TK, gates_TK * m.routed_scaling, probs_TE)


ROUTERS: dict[str, Callable[[MoEConfig, jax.Array, jax.Array], Routing]] = {
    "softmax": softmax_router,
    "sigmoid": sigmoid_router,
}


# ------------------------------------------------------------------------------------ grouped matmul (CPU)


def tile_rows(assignments: int, num_experts: int) -> int:
    """Rows per tile of the CPU grouped matmul: 128 (a dot XLA:CPU runs near a plain dot's speed), smaller when
    experts get few rows, so that padding each expert to whole tiles stays cheap."""
    per_expert = max(1, int(assignments) // num_experts)
    return max(8, min(128, 1 << (per_expert.bit_length() - 1)))


def _tiles(x_RK, w_EKN, expert_N, tile, unroll, transpose_w=False):
    def body(_, tile_and_expert):
        x_MK, e = tile_and_expert
        w_KN = jax.lax.dynamic_index_in_dim(w_EKN, e, keepdims=False)
        return None, (x_MK @ w_KN.T) if transpose_w else (x_MK @ w_KN)

    x_NMK = x_RK.reshape(-1, tile, x_RK.shape[-1])
    _, y_NMN = jax.lax.scan(body, None, (x_NMK, expert_N), unroll=unroll)
    return y_NMN.reshape(x_RK.shape[0], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def tiled_matmul(x_RK: jax.Array, w_EKN: jax.Array, expert_N: jax.Array, tile: int, unroll: int = 1) -> jax.Array:
    """Rows of x in tiles of `tile` rows, tile n multiplied by w[expert_N[n]]: one loop trip per tile, each a plain
    (tile x K) @ (K x N) dot. Backward: the same loop for dx, and each tile's x.T @ dy added into its expert's dw.
    (`unroll`: trips per loop iteration; XLA's cost analysis counts a loop's body once, so a test unrolls it.)"""
    return _tiles(x_RK, w_EKN, expert_N, tile, unroll)


def _tiled_fwd(x_RK, w_EKN, expert_N, tile, unroll):
    return _tiles(x_RK, w_EKN, expert_N, tile, unroll), (x_RK, w_EKN, expert_N)


def _tiled_bwd(tile, unroll, residuals, dy_RN):
    x_RK, w_EKN, expert_N = residuals
    dx_RK = _tiles(dy_RN, w_EKN, expert_N, tile, unroll, transpose_w=True)

    def body(dw_EKN, tile_and_expert):
        x_MK, dy_MN, e = tile_and_expert
        return dw_EKN.at[e].add((x_MK.T @ dy_MN).astype(dw_EKN.dtype)), None

    x_NMK = x_RK.reshape(-1, tile, x_RK.shape[-1])
    dy_NMN = dy_RN.reshape(-1, tile, dy_RN.shape[-1])
    dw_EKN, _ = jax.lax.scan(body, jnp.zeros_like(w_EKN), (x_NMK, dy_NMN, expert_N), unroll=unroll)
    return dx_RK, dw_EKN, None


tiled_matmul.defvjp(_tiled_fwd, _tiled_bwd)


# -------------------------------------------------------------------------------------------------- dispatch


@dataclasses.dataclass(frozen=True)
class Rows:
    """Where assignments sit in the grouped buffer: `row_A` (== num_rows: dropped), and the grouped matmul
    `matmul(x_RD, w_EDF) -> y_RF` of that buffer (row r multiplied by its expert's weights)."""

    row_A: jax.Array
    num_rows: int
    matmul: Callable[[jax.Array, jax.Array], jax.Array]
    dropped: jax.Array  # float32 scalar: the fraction of assignments dropped
    limit: int  # the most assignments one expert keeps


def _ranks(experts_A: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """(each assignment's rank among its expert's, in assignment order; assignments per expert). An expert id of
    `num_experts` is no expert (padding): ranked among its own, not counted."""
    A = experts_A.shape[0]
    order_A = jnp.argsort(experts_A, stable=True)
    counts_E = jnp.bincount(experts_A, length=num_experts + 1)
    starts_E = jnp.cumsum(counts_E) - counts_E
    rank_sorted_A = jnp.arange(A, dtype=jnp.int32) - starts_E[experts_A[order_A]].astype(jnp.int32)
    return jnp.zeros(A, jnp.int32).at[order_A].set(rank_sorted_A), counts_E[:num_experts]


def grouped_rows(num_experts: int, experts_A: jax.Array, backend: str | None = None) -> Rows:
    """Rows grouped by expert, none dropped (an expert id of `num_experts`, padding, gets no row). CPU: each
    expert's rows padded to whole tiles for `tiled_matmul`; other backends: packed, for `ragged_dot`."""
    E, A = num_experts, experts_A.shape[0]
    rank_A, counts_E = _ranks(experts_A, E)
    real_A = experts_A < E
    expert_A = jnp.minimum(experts_A, E - 1)
    if (backend or jax.default_backend()) != "cpu":
        starts_E = jnp.cumsum(counts_E) - counts_E
        matmul = lambda x, w: jax.lax.ragged_dot(x, w, counts_E.astype(jnp.int32))  # noqa: E731
        return Rows(jnp.where(real_A, starts_E[expert_A] + rank_A, A), A, matmul, jnp.zeros((), jnp.float32), A)
    tile = tile_rows(A, E)
    num_tiles = (A + E * (tile - 1)) // tile  # enough for any split of A rows padded per expert
    tiles_E = (counts_E + tile - 1) // tile
    ends_E = jnp.cumsum(tiles_E)
    expert_N = jnp.minimum(jnp.searchsorted(ends_E, jnp.arange(num_tiles), side="right"), E - 1)
    row_A = jnp.where(real_A, (ends_E - tiles_E)[expert_A] * tile + rank_A, num_tiles * tile)
    matmul = lambda x, w: tiled_matmul(x, w, expert_N.astype(jnp.int32), tile)  # noqa: E731
    return Rows(row_A, num_tiles * tile, matmul, jnp.zeros((), jnp.float32), A)


def dropless_rows(m: MoEConfig, experts_A: jax.Array, backend: str | None = None) -> Rows:
    """Every assignment gets a row in its expert's group."""
    return grouped_rows(m.num_experts, experts_A, backend)


def capacity(m: MoEConfig, assignments: int) -> int:
    return max(1, math.ceil(m.capacity_factor * assignments / m.num_experts))


def capacity_rows(m: MoEConfig, experts_A: jax.Array, backend: str | None = None) -> Rows:
    """`capacity` rows per expert; an expert's assignments past it are dropped (in assignment order)."""
    E, A = m.num_experts, experts_A.shape[0]
    C = capacity(m, A)
    rank_A, _ = _ranks(experts_A, E)
    kept_A = rank_A < C
    row_A = jnp.where(kept_A, experts_A * C + rank_A, E * C)

    def matmul(x_RD, w_EDF):
        return jnp.einsum("ecd,edf->ecf", x_RD.reshape(E, C, -1), w_EDF).reshape(E * C, -1)

    return Rows(row_A, E * C, matmul, 1.0 - jnp.mean(kept_A.astype(jnp.float32)), C)


DISPATCHES: dict[str, Callable[..., Rows]] = {"dropless": dropless_rows, "capacity": capacity_rows}


def swiglu_grouped(x_GD: jax.Array, w_gate_EDF, w_up_EDF, w_down_EFD, rows: Rows, observe=None) -> jax.Array:
    """SwiGLU_{expert of row g}(x_g) for each row of the grouped buffer `rows` describes. `observe(name, rows)`
    (calibration) is shown each weight's input rows."""
    h_GF = nn.silu(rows.matmul(x_GD, w_gate_EDF)) * rows.matmul(x_GD, w_up_EDF)
    if observe is not None:
        observe("gate", x_GD)
        observe("up", x_GD)
        observe("down", h_GF)
    return rows.matmul(h_GF, w_down_EFD)


def _grouped_sources(rows: Rows, count: int) -> jax.Array:
    """For each row of the grouped buffer, which of the `count` inputs it holds (`count`: none)."""
    return jnp.full(rows.num_rows + 1, count, jnp.int32).at[rows.row_A].set(jnp.arange(count, dtype=jnp.int32))


def _with_zero_row(x_RD: jax.Array) -> jax.Array:
    return jnp.concatenate([x_RD, jnp.zeros((1, x_RD.shape[-1]), x_RD.dtype)])


def grouped_ffn(x_RD: jax.Array, expert_R: jax.Array, w_gate_LDF, w_up_LDF, w_down_LFD) -> jax.Array:
    """Row r through expert expert_R[r] of the given L experts, grouped and without a row dropped; an expert id of
    L (padding) gives a zero row. What parallel/expert.py runs on the rows it received."""
    R = x_RD.shape[0]
    rows = grouped_rows(w_gate_LDF.shape[0], expert_R)
    x_GD = _with_zero_row(x_RD)[_grouped_sources(rows, R)[: rows.num_rows]]
    return _with_zero_row(swiglu_grouped(x_GD, w_gate_LDF, w_up_LDF, w_down_LFD, rows))[rows.row_A]


def experts_ffn(
    x_TD: jax.Array, routing: Routing, w_gate_EDF, w_up_EDF, w_down_EFD, rows: Rows, observe=None
) -> jax.Array:
    """sum_k gate_k * SwiGLU_{expert_k}(x) per token, through the grouped buffer `rows` describes. Assignment a
    is (choice a // T, token a % T): first choices first, which is the order capacity dispatch keeps them in.
    `observe(name, x_RK, expert_R)` (calibration) is shown each expert weight's input rows and their experts."""
    T, D = x_TD.shape
    K = routing.experts_TK.shape[1]
    A = T * K
    # Which assignment each row holds (A: none), then its token (T: the zero row).
    source_R = _grouped_sources(rows, A)[: rows.num_rows]
    token_R = jnp.where(source_R < A, source_R % T, T)
    seen = None
    if observe is not None:
        E = w_gate_EDF.shape[0]
        experts_A = routing.experts_TK.T.reshape(-1)
        expert_R = jnp.where(source_R < A, experts_A[jnp.minimum(source_R, A - 1)], E)  # padding rows: no expert
        seen = lambda name, x_RK: observe(name, x_RK, expert_R)  # noqa: E731
    y_RD = swiglu_grouped(_with_zero_row(x_TD)[token_R], w_gate_EDF, w_up_EDF, w_down_EFD, rows, seen)
    y_AD = _with_zero_row(y_RD)[rows.row_A]  # dropped: zero
    gates_KT = routing.gates_TK.T.astype(y_AD.dtype)
    return jnp.einsum("ktd,kt->td", y_AD.reshape(K, T, D), gates_KT)


# ------------------------------------------------------------------------------------------------- the layer


class MoE(nn.Module):
    """The MoE MLP kind: `x_BTD -> (y_BTD, aux)`. When the mesh splits experts over devices, `rt.hooks.experts`
    (parallel/expert.py) moves each assignment to its expert's device and back; else `experts_ffn` runs here."""

    cfg: ModelConfig
    rt: Runtime = TRAINING

    config_group = (NAME, MoEConfig)

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, dict]:
        cfg, m, rt = self.cfg, self.cfg.moe, self.rt
        B, T, D = x_BTD.shape
        E, F, dtype = m.num_experts, m.d_ff_of(cfg), jnp.dtype(cfg.dtype)
        x_TD = x_BTD.reshape(B * T, D)

        router_init = normal(hidden_std(cfg))
        router_DE = weights.weight(self, rt.weights, "router", router_init, (D, E), ("embed", None), cfg, jnp.float32)
        bias = self.variable("state", "bias", nn.with_logical_partitioning(jnp.zeros, (None,)), (E,), jnp.float32)
        x_router_TD = x_TD.astype(jnp.float32)
        if m.router_noise > 0 and self.has_rng("noise"):
            jitter = jax.random.uniform(self.make_rng("noise"), x_router_TD.shape, jnp.float32, -1.0, 1.0)
            x_router_TD = x_router_TD * (1.0 + m.router_noise * jitter)
        observe(self, "router", x_router_TD)
        logits_TE = x_router_TD @ router_DE  # float32, whatever the compute dtype
        bias_E = jax.lax.stop_gradient(nn.unbox(bias.value))
        routing = ROUTERS[m.router](m, logits_TE, bias_E)

        def expert_weights(name, shape, axes, std):
            layout = weights.Layout(fan_in=(1,), batch=(0,))  # [experts, in, out]
            return weights.weight(self, rt.weights, name, normal(std), shape, axes, cfg, layout=layout)

        w_gate = expert_weights("gate", (E, D, F), ("experts", "embed", "mlp"), hidden_std(cfg))
        w_up = expert_weights("up", (E, D, F), ("experts", "embed", "mlp"), hidden_std(cfg))
        w_down = expert_weights("down", (E, F, D), ("experts", "mlp", "embed"), output_std(cfg))

        experts_A = routing.experts_TK.T.reshape(-1)
        rows = DISPATCHES[m.dispatch](m, experts_A)
        if (collectives := rt.hooks.experts) is None:
            seen = None
            if self.is_mutable_collection(CALIBRATION):
                seen = lambda name, x_RK, expert_R: observe(self, name, x_RK, expert_R, E)  # noqa: E731
            y_TD = experts_ffn(x_TD.astype(dtype), routing, w_gate, w_up, w_down, rows, seen)
        else:
            kept_TK = (rows.row_A < rows.num_rows).reshape(-1, B * T).T
            args = (routing.experts_TK, routing.gates_TK, kept_TK, w_gate, w_up, w_down, rows.limit, grouped_ffn)
            y_TD = collectives(x_TD.astype(dtype), *args)
        if m.num_shared_experts:
            shared = dataclasses.replace(cfg, d_ff=m.num_shared_experts * F)
            y_TD = y_TD + SwiGLU(shared, rt, name="shared")(x_TD[None])[0][0].astype(y_TD.dtype)

        counts_E = jnp.bincount(experts_A, length=E).astype(jnp.float32)
        mean_load = experts_A.shape[0] / E
        if m.bias_update_rate and self.is_mutable_collection("state") and not self.is_initializing():
            bias.value = nn.unbox(bias.value) + m.bias_update_rate * jnp.sign(mean_load - counts_E)
        aux = {
            "moe_aux_loss": Aux(balance_loss(routing, E), m.aux_loss_weight),
            "moe_z_loss": Aux(jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1))), m.z_loss_weight),
            "moe_max_load": Aux(jnp.max(counts_E) / mean_load),
            "moe_dropped_frac": Aux(rows.dropped),
        }
        return y_TD.reshape(B, T, D).astype(x_BTD.dtype), aux

    @staticmethod
    def config_errors(cfg: ModelConfig) -> list[tuple[bool, str, object, str]]:
        return config_errors(cfg.moe)

    @staticmethod
    def mesh_errors(cfg: ModelConfig, mesh) -> list[tuple[bool, str, object, str]]:
        """`mesh` a parallel.config.MeshConfig (read, never imported: model/ knows no meshes)."""
        m = cfg.moe
        return [
            (
                mesh.expert < 1 or m.num_experts % mesh.expert == 0,
                _KEY + "num_experts",
                m.num_experts,
                f"must be divisible by mesh.expert={mesh.expert} (each device of the expert axis holds as many experts)",
            )
        ]

    @staticmethod
    def mesh_dims(cfg: ModelConfig) -> dict[str, tuple[str, int]]:
        """The dimensions it splits over the mesh: logical name -> (the config key that sets it, its size)."""
        return {"experts": (_KEY + "num_experts", cfg.moe.num_experts)}

    @staticmethod
    def layer_kind(cfg: ModelConfig, layer: int) -> str:
        return NAME if cfg.moe.sparse(layer) else DENSE

    @staticmethod
    def param_count(cfg: ModelConfig) -> int:
        m = cfg.moe
        return 3 * cfg.d_model * m.d_ff_of(cfg) * (m.num_experts + m.num_shared_experts) + cfg.d_model * m.num_experts

    @staticmethod
    def matmul_params(cfg: ModelConfig) -> int:
        """Weights each token is multiplied by: the router, its top_k experts and the shared ones."""
        m = cfg.moe
        return 3 * cfg.d_model * m.d_ff_of(cfg) * (m.top_k + m.num_shared_experts) + cfg.d_model * m.num_experts


def balance_loss(routing: Routing, num_experts: int) -> jax.Array:
    """Switch's E * sum_i f_i P_i: f_i the fraction of assignments to expert i, P_i its mean router probability
    (1.0 when both are uniform)."""
    f_E = jnp.mean(jax.nn.one_hot(routing.experts_TK, num_experts, dtype=jnp.float32), axis=(0, 1))
    P_E = jnp.mean(routing.probs_TE, axis=0)
    return num_experts * jnp.sum(f_E * P_E)


def config_errors(m: MoEConfig) -> list[tuple[bool, str, object, str]]:
    """(condition that must hold, config key, value, what is allowed) for `model.moe`."""
    E = max(m.num_experts, 1)
    group = E // m.n_group if m.n_group > 0 and E % m.n_group == 0 else E
    return [
        (m.num_experts > 0, _KEY + "num_experts", m.num_experts, "must be > 0"),
        (0 < m.top_k <= m.num_experts, _KEY + "top_k", m.top_k, f"must be in [1, num_experts={m.num_experts}]"),
        (m.d_ff_expert >= 0, _KEY + "d_ff_expert", m.d_ff_expert, "must be >= 0 (0: model.d_ff)"),
        (m.num_shared_experts >= 0, _KEY + "num_shared_experts", m.num_shared_experts, "must be >= 0"),
        (m.first_dense_layers >= 0, _KEY + "first_dense_layers", m.first_dense_layers, "must be >= 0"),
        (m.every > 0, _KEY + "every", m.every, "must be > 0"),
        (m.router in ROUTERS, _KEY + "router", m.router, "one of " + ", ".join(map(repr, ROUTERS))),
        (m.dispatch in DISPATCHES, _KEY + "dispatch", m.dispatch, "one of " + ", ".join(map(repr, DISPATCHES))),
        (m.routed_scaling > 0, _KEY + "routed_scaling", m.routed_scaling, "must be > 0"),
        (
            m.n_group > 0 and m.num_experts % m.n_group == 0,
            _KEY + "n_group",
            m.n_group,
            f"must be > 0 and divide num_experts={m.num_experts}",
        ),
        (m.n_group == 1 or m.router == "sigmoid", _KEY + "n_group", m.n_group, "must be 1 unless router='sigmoid'"),
        (0 < m.topk_group <= m.n_group, _KEY + "topk_group", m.topk_group, f"must be in [1, n_group={m.n_group}]"),
        (
            m.top_k <= m.topk_group * group,
            _KEY + "top_k",
            m.top_k,
            f"must be <= topk_group * experts per group = {m.topk_group * group}",
        ),
        (m.aux_loss_weight >= 0, _KEY + "aux_loss_weight", m.aux_loss_weight, "must be >= 0"),
        (m.z_loss_weight >= 0, _KEY + "z_loss_weight", m.z_loss_weight, "must be >= 0"),
        (0 <= m.router_noise < 1, _KEY + "router_noise", m.router_noise, "must be in [0, 1)"),
        (m.bias_update_rate >= 0, _KEY + "bias_update_rate", m.bias_update_rate, "must be >= 0 (0: off)"),
        (m.capacity_factor > 0, _KEY + "capacity_factor", m.capacity_factor, "must be > 0"),
    ]
