"""A Llama-style decoder in one file: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Module names follow transformers' `LlamaForCausalLM` so that export is a renaming:
`hf_state_dict(model)` prefixes `model.` to everything but `lm_head`. RoPE uses the HF
`rotate_half` layout (dimension i of a head is paired with i + head_dim/2), so Q/K weights
map to transformers unchanged; llama.cpp pairs consecutive dimensions and its converter
permutes Q and K rows (`permute(w, n_head)`, K with n_kv_head).

Speed: parameters stay split (`q_proj`, `k_proj`, `v_proj`, `gate_proj`, `up_proj`), so the
state dict, checkpoints, optimizer state, exports and everything that edits or hooks a weight by
name see the HF layout; the forward concatenates them and runs one matmul for Q/K/V and one for
gate/up (the concatenation copies the weights once per forward, far less than the matmul reads;
autograd hands each parameter its slice of the fused gradient). RoPE rotates Q and K together
with one roll instead of chunk/neg/cat per tensor. fp32 training in eager mode takes three
`autograd.Function`s with hand-written backwards (RMSNorm on CPU, RoPE on the fused Q|K|V, SwiGLU
on the fused gate|up) that write their gradients where the next op reads them instead of
splitting and re-concatenating; its RoPE is one complex multiply, on Q/K rows that the fused
weight reorders per head into rotation pairs (attention sees only q.k, which the reordering of
both leaves as it is). Inference, exports and `torch.compile` see the plain ops. On CPU every
extra kernel is also an OpenMP barrier, which is what a loaded machine punishes most.

Shapes in comments: B batch, T new tokens, S keys (cached + new), C d_model,
H query heads, K key/value heads, D head_dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class SequenceTooLongError(ValueError):
    """A forward pass reached past `max_seq_len` (the RoPE tables' length)."""


class _RMSNormCPU(torch.autograd.Function):
    """fp32 RMSNorm on CPU with a hand-written backward.

    On CPU `F.rms_norm` is a composite (torch 2.13 has fused kernels, forward and backward, for
    CUDA only): autograd records pow/mean/add/rsqrt/mul and replays ~13 kernels backward, which
    measured 1.7x the cost of the plain formula. The forward here is 3 passes. The backward is
    LayerNorm's fused CPU kernel (`native_layer_norm_backward`) told that the mean is zero, plus
    one correction: with mean 0 and our rstd, LayerNorm's dx is
    rstd * (gw - mean(gw) - xhat * mean(gw * xhat)), gw = grad * weight, xhat = x * rstd, and
    RMSNorm's lacks the mean(gw) term; mean(gw) is a matrix-vector product (grad @ weight / C).
    Its dweight, sum(grad * xhat), is RMSNorm's as it stands. ~6x faster than the 7 elementwise
    passes it replaced (4.5 -> 0.7 ms on [8, 256, 256], one thread).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        C = x.size(-1)
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(C).add_(eps).rsqrt_()  # [..., 1]
        ctx.save_for_backward(x, rstd, weight)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        C = x.size(-1)
        dx, dweight, _ = torch.ops.aten.native_layer_norm_backward(
            grad.contiguous(), x, [C], torch.zeros_like(rstd), rstd, weight, None,
            [True, ctx.needs_input_grad[1], False],
        )
        mean_gw = torch.matmul(grad, weight).unsqueeze_(-1).div_(C)  # [..., 1]
        return dx.addcmul_(rstd, mean_gw), dweight, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if x.device.type == "cpu":
                return _RMSNormCPU.apply(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Half-precision activations: normalise in fp32 and scale after the cast back, as HF does,
        # so that bf16 autocast does not lose the small variances (and exports match HF exactly).
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, D] in the rotate_half layout: frequencies repeated as (f, f)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # [max_len, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, D]
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] rotated by cos/sin tables broadcastable to it (e.g. x [B, H, T, D], cos [1, 1, T, D]).

    HF's x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) for the halves x1, x2:
    (-x2, x1) * sin == roll(x, D/2) * (-sin1, sin2), so the sign moves onto the small table and
    the activations pay one roll instead of a chunk, a negation and a cat.
    """
    half = x.size(-1) // 2
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return (x * cos + x.roll(half, dims=-1) * sin).to(x.dtype)


def _hand_written_backward(t: torch.Tensor, *projections: nn.Module) -> bool:
    """Whether a block takes its `autograd.Function` path (`_RopeQKV`, `_SwiGLU`): fp32 training in
    eager mode, i.e. `t` (the op's input) needs a gradient, or one of `projections` will give it one,
    and no autocast turns the projections' outputs into half precision. Inference, exports and
    autocast take the plain ops, and so does `torch.compile`, whose inductor fuses the plain
    elementwise chains itself."""
    grad = t.requires_grad or (torch.is_grad_enabled() and any(p.weight.requires_grad for p in projections))
    return (t.dtype == torch.float32 and grad and not torch.is_autocast_enabled(t.device.type)
            and not torch.compiler.is_compiling())


def _complex_pairs(t: torch.Tensor) -> torch.Tensor:
    """A real [..., D] tensor as complex [..., D/2], consecutive dimensions (2j, 2j+1) as one number: a view
    (of a contiguous copy when the last dimension is strided, so never use that case as an `out=`)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return torch.view_as_complex(t.unflatten(-1, (-1, 2)))


class _RopeQKV(torch.autograd.Function):
    """fp32 training path of `Attention._qkv`: the fused projection's output [B, T, H + 2K, D] in,
    rotated q [B, T, H, D], rotated k [B, T, K, D] and v [B, T, K, D] out.

    Q and K arrive in the interleaved layout (`_interleaved_rows`): dimension j of the rotate_half
    layout and its partner j + D/2 sit side by side, so the rotation is one complex multiply by
    freqs = cos a + i sin a per pair (3.3x the speed of four half-width real passes, measured on
    [8, 256, 12, 32]). Attention only takes dot products of q with k, which the same permutation of
    both leaves unchanged, and v is not permuted, so the block's output is the rotate_half one's.
    The backward multiplies by conj(freqs) (the rotation's transpose) and writes dq, dk and dv
    straight into one [B, T, H + 2K, D] gradient: no cats reassemble the split.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, freqs: torch.Tensor, n_head: int, n_kv_head: int):
        # freqs: complex [B or 1, T, 1, D/2], cos + i sin of the first half's angles.
        H, K = n_head, n_kv_head
        qk = qkv.new_empty(qkv.shape[:2] + (H + K, qkv.size(-1)))
        torch.mul(_complex_pairs(qkv[:, :, :H + K]), freqs, out=_complex_pairs(qk))
        ctx.save_for_backward(freqs)
        ctx.heads = (H, K)
        q, k = qk.split((H, K), dim=2)
        return q, k, qkv[:, :, H + K:]

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        (freqs,) = ctx.saved_tensors
        H, K = ctx.heads
        B, T, _, D = dq.shape
        dqkv = dq.new_empty(B, T, H + 2 * K, D)
        back = freqs.conj().resolve_conj()  # multiplying by f is a rotation; its transpose, by conj(f)
        torch.mul(_complex_pairs(dq), back, out=_complex_pairs(dqkv[:, :, :H]))
        torch.mul(_complex_pairs(dk), back, out=_complex_pairs(dqkv[:, :, H:H + K]))
        dqkv[:, :, H + K:].copy_(dv)
        return dqkv, None, None, None


def _interleaved_rows(weight: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """A Q or K projection [heads * D, C] as [heads, D/2, 2, C]: per head, rotate_half's row order
    (x1 | x2, dimension j paired with j + D/2) becomes (x1_0, x2_0, x1_1, x2_1, ...), the pairs of
    `_RopeQKV`'s complex multiply. A view (of a contiguous weight); the concatenation that fuses the
    projections copies it."""
    return weight.reshape(heads, 2, head_dim // 2, -1).transpose(1, 2)


class KVCache:
    """Preallocated keys/values per layer, [B, K, max_len, D], filled left to right.

    `pos` counts the positions already filled; the model advances it after each forward.
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, max_len: int, *, device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_len > config.max_seq_len:
            raise SequenceTooLongError(
                f"KV cache of {max_len} positions exceeds max_seq_len={config.max_seq_len}; "
                "generate fewer tokens or build the model with a larger max_seq_len"
            )
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, K, T, D] at `pos` and return all keys/values so far, [B, K, S, D]."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise SequenceTooLongError(f"KV cache full: {end} positions > {self.max_len}")
        self.k[layer][:, :, self.pos:end] = k.to(self.k[layer].dtype)
        self.v[layer][:, :, self.pos:end] = v.to(self.v[layer].dtype)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def _fused_linear(x: torch.Tensor, *projections: nn.Module) -> torch.Tensor:
    """x through several bias-free projections at once: one matmul over their stacked weights.

    Modules that are not plain `nn.Linear` (a dynamically quantized copy, whose `weight` is a
    method, or anything swapped in by a tool) are applied one by one and concatenated.
    """
    if all(type(p) is nn.Linear for p in projections):
        return F.linear(x, torch.cat([p.weight for p in projections]))
    return torch.cat([p(x) for p in projections], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C = config.d_model
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache | None = None):
        """x [B, T, C]; cos/sin [B or 1, 1, T, D] -> q [B, H, T, D], k and v [B, K, T, D] (q, k rotated).

        Training in eager mode (and no cache) takes `_RopeQKV`: q and k come out in its interleaved
        layout, which only attention's q.k products see. Everything else, cached keys included,
        gets the rotate_half layout.
        """
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if kv_cache is None and all(type(p) is nn.Linear for p in projections) and _hand_written_backward(x, *projections):
            weight = torch.cat((_interleaved_rows(self.q_proj.weight, H, D), _interleaved_rows(self.k_proj.weight, K, D),
                                self.v_proj.weight.reshape(K, D // 2, 2, -1)))  # [H + 2K, D/2, 2, C]
            qkv = F.linear(x, weight.flatten(0, 2)).view(B, T, H + 2 * K, D)
            half = D // 2
            freqs = torch.complex(cos[..., :half], sin[..., :half]).transpose(1, 2)  # [B or 1, T, 1, D/2]
            q, k, v = _RopeQKV.apply(qkv, freqs, H, K)
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        qkv = _fused_linear(x, *projections).view(B, T, H + 2 * K, D)
        # Q and K heads side by side get one rotation; the tables broadcast over heads as [., T, 1, D].
        # split, not slicing: its backward is one cat, where each slice's backward zero-fills a full-size gradient.
        qk, v = qkv.split((H + K, K), dim=2)
        qk = apply_rope(qk, cos.transpose(1, 2), sin.transpose(1, 2))  # [B, T, H + K, D]
        q, k = qk.split((H, K), dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self._qkv(x, cos, sin, kv_cache)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # [B, K, S, D]
        # attn_mask None means plain causal over T == S (or a single new token seeing all keys).
        is_causal = attn_mask is None and q.size(2) == k.size(2) and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.n_kv_head != self.n_head
        )  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Explicit causal attention weights [B, H, T, T] (for probes; SDPA never materialises them)."""
        q, k, _ = self._qkv(x, cos, sin)
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # [B, H, T, D]
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(self.head_dim)  # [B, H, T, T]
        T = x.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up from the fused gate|up projection [..., 2F], with its gradient written
    straight into one [..., 2F] tensor (fp32 training path of `MLP`).

    Autograd over chunk + silu + mul makes the same three products backward but returns dgate and
    dup apart, and the chunk's backward then copies both into a fresh [..., 2F]: a full extra pass
    over the largest activation of the block.
    """

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        d = torch.empty_like(gate_up)
        d_gate, d_up = d.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        torch.mul(grad, act, out=d_up)
        return d


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = _fused_linear(x, self.gate_proj, self.up_proj)  # [B, T, 2F]
        if _hand_written_backward(gate_up):
            return self.down_proj(_SwiGLU.apply(gate_up))  # training: the gradient lands fused
        gate, up = gate_up.chunk(2, dim=-1)  # [B, T, F] each
        return self.down_proj(F.silu(gate) * up)  # [B, T, C]


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))  # [B, T, C]


class Llama(nn.Module):
    """Decoder-only language model; `forward` returns logits [B, T, V]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        # Derived from the config, so not part of the state dict (nor of checkpoints/exports).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std); residual output projections scaled by 1/sqrt(2*n_layer) (GPT-2)."""
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=resid_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)
        cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def num_params(self, *, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # shared (tied) parameters counted once
        if exclude_embedding and not self.config.tie_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V].

        position_ids [B, T]: RoPE positions (default: consecutive from the cache position).
        attention_mask [B, S]: 1 for real tokens, 0 for padding, over every key position
        (cached + new, S = kv_cache.pos + T); combined with the causal mask.
        kv_cache: appended to and advanced by T.
        """
        return self.lm_head(self.hidden_states(input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                               kv_cache=kv_cache))  # [B, T, V]

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The final norm's output [B, T, C], what `lm_head` turns into logits (arguments as `forward`):
        the trainer feeds it to `shared.model.loss.linear_cross_entropy` with the head's weight."""
        B, T = input_ids.shape
        offset = kv_cache.pos if kv_cache is not None else 0
        if position_ids is None:
            if offset + T > self.config.max_seq_len:
                raise SequenceTooLongError(
                    f"sequence of {offset + T} tokens exceeds max_seq_len={self.config.max_seq_len}; "
                    "shorten the input or raise ModelConfig.max_seq_len"
                )
            cos = self.rope_cos[offset:offset + T][None, None]  # [1, 1, T, D]
            sin = self.rope_sin[offset:offset + T][None, None]
        else:
            if int(position_ids.max()) >= self.config.max_seq_len:
                raise SequenceTooLongError(
                    f"position id {int(position_ids.max())} >= max_seq_len={self.config.max_seq_len}"
                )
            cos = self.rope_cos[position_ids].unsqueeze(1)  # [B, 1, T, D]
            sin = self.rope_sin[position_ids].unsqueeze(1)
        mask = None
        if attention_mask is not None or (kv_cache is not None and offset > 0 and T > 1):
            mask = self._mask(attention_mask, B, T, offset, input_ids.device)  # [B, 1, T, S]

        x = self.embed_tokens(input_ids)  # [B, T, C]
        for block in self.layers:
            x = block(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.pos = offset + T
        return self.norm(x)  # [B, T, C]

    @staticmethod
    def _mask(attention_mask: torch.Tensor | None, B: int, T: int, offset: int, device) -> torch.Tensor:
        S = offset + T
        q_idx = torch.arange(offset, S, device=device)[:, None]  # [T, 1]
        k_idx = torch.arange(S, device=device)[None, :]  # [1, S]
        allowed = (k_idx <= q_idx)[None, None]  # [1, 1, T, S]
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ValueError(
                    f"attention_mask must be [B, S] = [{B}, {S}] (cached + new), got {tuple(attention_mask.shape)}"
                )
            allowed = allowed & attention_mask.bool()[:, None, None, :]
            # A padding query that sees no key would give NaN; let every query see itself.
            allowed = allowed | (k_idx == q_idx)[None, None]
        return allowed.expand(B, 1, T, S)


# --- transformers mapping ---------------------------------------------------------------


def hf_name(name: str) -> str:
    """Our parameter name -> `LlamaForCausalLM`'s (`layers.0.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj.weight`)."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def hf_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """The state dict under transformers' names; `lm_head.weight` omitted when tied
    (transformers re-ties it from `tie_word_embeddings=True`)."""
    out = {}
    for name, t in model.state_dict().items():
        if model.config.tie_embeddings and name == "lm_head.weight":
            continue
        out[hf_name(name)] = t
    return out


def hf_config(config: ModelConfig) -> dict:
    """Keyword arguments for `transformers.LlamaConfig` describing the same network."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_hidden,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
