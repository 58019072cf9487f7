"""The decoder as one compiled graph over a flat token axis: Llama, Qwen2 and Qwen3 checkpoints.

Run op by op in eager PyTorch, one decode step of SmolLM2-135M was ~6,200 aten calls whose dispatch cost more than
their arithmetic. Here the whole forward pass (embedding, every layer, the final norm) is one function traced by
Dynamo and compiled by Inductor, with the weights of a loaded transformers model rearranged for it once: q, k and v
fused into one matmul, gate and up into another. Its inputs are flat: `tokens` and `positions` of any mix of prefill
chunks and decodes, one row each, with that axis marked dynamic, so every batch composition runs the same graph
(vLLM's CPU design). Attention is the registered op of attention.py, opaque to the compiler. The logits are
computed outside the graph for the few rows the sampler needs (the last row of each sequence).

A checkpoint of another architecture is not supported here; the engine then runs transformers' own loop.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from service.engines.compiled import attention  # noqa: F401  (registers chatserve::paged_attention)

log = logging.getLogger(__name__)

# Batches of at most this many rows run on int8 weights where the model has them (see Decoder.quantize_int8).
INT8_MAX_ROWS = 6



class Decoder(torch.nn.Module):
    """A transformers causal LM's weights, fused and laid out for the flat-batch forward pass below."""

    def __init__(self, model: torch.nn.Module, max_positions: int) -> None:
        super().__init__()
        config = model.config
        inner = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.layers = len(inner.layers)
        self.scale = self.head_dim**-0.5
        dtype = inner.embed_tokens.weight.dtype

        def param(t: torch.Tensor) -> torch.nn.Parameter:
            return torch.nn.Parameter(t.detach().contiguous(), requires_grad=False)

        self.embed = param(inner.embed_tokens.weight)
        self.norm = param(inner.norm.weight)
        self.lm_head = param(model.lm_head.weight)
        self.qkv = torch.nn.ParameterList()
        self.qkv_bias = torch.nn.ParameterList()
        self.o = torch.nn.ParameterList()
        self.gate_up = torch.nn.ParameterList()
        self.down = torch.nn.ParameterList()
        self.ln1 = torch.nn.ParameterList()
        self.ln2 = torch.nn.ParameterList()
        self.q_norm = torch.nn.ParameterList()
        self.k_norm = torch.nn.ParameterList()
        self.has_bias = inner.layers[0].self_attn.q_proj.bias is not None
        self.has_qk_norm = hasattr(inner.layers[0].self_attn, "q_norm")
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.qkv.append(param(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])))
            if self.has_bias:
                self.qkv_bias.append(param(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])))
            self.o.append(param(a.o_proj.weight))
            self.gate_up.append(param(torch.cat([m.gate_proj.weight, m.up_proj.weight])))
            self.down.append(param(m.down_proj.weight))
            self.ln1.append(param(layer.input_layernorm.weight))
            self.ln2.append(param(layer.post_attention_layernorm.weight))
            if self.has_qk_norm:
                self.q_norm.append(param(a.q_norm.weight))
                self.k_norm.append(param(a.k_norm.weight))
        self.intermediate = self.gate_up[0].shape[0] // 2
        # The rotary embedding of every position, from the model's own rotary module (so every rope scaling type
        # it knows, llama3, yarn, dynamic, is honoured), as one table the graph indexes.
        with torch.no_grad():
            positions = torch.arange(max_positions).unsqueeze(0)
            probe = torch.zeros(1, dtype=torch.float32)
            cos, sin = inner.rotary_emb(probe, positions)
        half = self.head_dim // 2
        self.register_buffer("cos", cos[0, :, :half].to(torch.float32).contiguous(), persistent=False)
        self.register_buffer("sin", sin[0, :, :half].to(torch.float32).contiguous(), persistent=False)
        self.dtype = dtype
        self.int8 = False

    def cast(self, dtype: torch.dtype) -> None:
        """The weights in `dtype` (the rotary tables stay float32)."""
        for param in self.parameters():
            param.data = param.data.to(dtype)
        self.dtype = dtype

    def quantize_int8(self) -> None:
        """Weight-only int8 beside the dense weights: every linear weight (lm_head included) also as int8 rows with
        one scale per output row, multiplied by PyTorch's own CPU kernel for it (`aten._weight_int8pack_mm`, the
        kernel torchao's CPU int8 weight-only path calls). That kernel reads a quarter of float32's bytes but its
        cost grows with the rows (measured, a 3072x576 weight, Xeon AMX: 166 us at 1 row, 415 at 8, 1,840 at 64,
        against bf16's 283 / 307 / 406), so batches of few rows run `forward_int8` and larger ones the dense
        `forward` (INT8_MAX_ROWS)."""
        if self.dtype != torch.bfloat16:
            raise ValueError("int8 weights compute in bfloat16: use --dtype bfloat16 (or auto)")
        for name in ("qkv", "o", "gate_up", "down"):
            weights, scales = torch.nn.ParameterList(), torch.nn.ParameterList()
            for w in getattr(self, name):
                q, scale = _quantize_rows(w)
                weights.append(q)
                scales.append(scale)
            setattr(self, name + "_q", weights)
            setattr(self, name + "_scale", scales)
        self.lm_head_q, self.lm_head_scale = _quantize_rows(self.lm_head)
        self.int8 = True

    def _linear(self, x: torch.Tensor, name: str, i: int, int8: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
        if int8:
            y = torch.ops.aten._weight_int8pack_mm(x, getattr(self, name + "_q")[i], getattr(self, name + "_scale")[i])
            return y if bias is None else y + bias
        return F.linear(x, getattr(self, name)[i], bias)

    def forward_int8(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`forward` with the int8 weights (after `quantize_int8`), for batches of at most INT8_MAX_ROWS rows."""
        return self._forward(tokens, positions, True)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions: [rows]. Returns the final-normed hidden state of every row, [rows, hidden]."""
        return self._forward(tokens, positions, False)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, int8: bool) -> torch.Tensor:
        rows = tokens.shape[0]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        h = F.embedding(tokens, self.embed)
        cos = self.cos[positions].unsqueeze(1)  # [rows, 1, head_dim / 2]
        sin = self.sin[positions].unsqueeze(1)
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        for i in range(self.layers):
            x = _rms_norm(h, self.ln1[i], self.eps)
            qkv = self._linear(x, "qkv", i, int8, self.qkv_bias[i] if self.has_bias else None)
            q = qkv[:, :q_size].view(rows, heads, head_dim)
            k = qkv[:, q_size : q_size + kv_size].view(rows, kv_heads, head_dim)
            v = qkv[:, q_size + kv_size :].view(rows, kv_heads, head_dim)
            if self.has_qk_norm:
                q = _rms_norm(q, self.q_norm[i], self.eps)
                k = _rms_norm(k, self.k_norm[i], self.eps)
            q = _rope(q, cos, sin)
            k = _rope(k, cos, sin)
            o = torch.ops.chatserve.paged_attention(q.contiguous(), k.contiguous(), v.contiguous(), i)
            h = h + self._linear(o.view(rows, q_size), "o", i, int8)
            x = _rms_norm(h, self.ln2[i], self.eps)
            gate_up = self._linear(x, "gate_up", i, int8)
            gate, up = gate_up[:, : self.intermediate], gate_up[:, self.intermediate :]
            h = h + self._linear(F.silu(gate) * up, "down", i, int8)
        return _rms_norm(h, self.norm, self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] → float32 logits [rows, vocab] (outside the graph: only the rows that are sampled)."""
        if self.int8:
            return torch.ops.aten._weight_int8pack_mm(hidden.contiguous(), self.lm_head_q, self.lm_head_scale).float()
        return F.linear(hidden, self.lm_head).float()


def _quantize_rows(w: torch.Tensor) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """Symmetric per-row int8: row / (max |row| / 127), rounded."""
    scale = w.detach().float().abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w.detach().float() / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return (torch.nn.Parameter(q.contiguous(), requires_grad=False),
            torch.nn.Parameter(scale.to(w.dtype), requires_grad=False))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: normalise in float32, scale in the weights' dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # transformers' rotate_half convention: the two halves of each head are the rotated pairs.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
