"""What a config costs, computed from its shape alone (no model is built): parameters, FLOPs, memory.

FLOPs follow nanoGPT / PaLM (appendix B): a matmul weight costs 2 FLOPs per token forward and 6 for a
training step (forward + backward), plus attention's QK^T and AV: 4 * n_layer * seq_len * n_embd per token
forward (12 * ... for training), counted over the full context as PaLM does (no causal halving).
The LM head is a matmul even when tied to the embedding; the embedding lookups are free.

Activation memory is an estimate of what autograd keeps for backward in a training step, assuming
fused (flash / memory-efficient) attention, so no seq_len x seq_len matrix is stored.
"""

from __future__ import annotations

from typing import Any

from model.config import ModelConfig
from model.field_checks import check_choice, check_int

__all__ = ["profile_model", "format_profile", "param_counts"]

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameter counts by part; `total` equals `GPT(config).num_params()`."""
    c, kv, h, L, V = config.n_embd, config.kv_dim, config.hidden_dim, config.n_layer, config.vocab_size
    b = 1 if config.bias else 0
    norm = c * (2 if config.norm == "layernorm" and config.bias else 1)
    attn = 2 * c * c + 2 * c * kv + b * (2 * c + 2 * kv)
    n_mlp_in = 2 if config.mlp == "swiglu" else 1
    mlp = (n_mlp_in + 1) * c * h + b * (n_mlp_in * h + c)
    counts = {
        "token_embedding": V * c,
        "position_embedding": config.block_size * c if config.pos == "learned" else 0,
        "attention": L * attn,
        "mlp": L * mlp,
        "norms": (2 * L + 1) * norm,
        "lm_head": 0 if config.tie_weights else V * c,
        "per_layer": attn + mlp + 2 * norm,
    }
    counts["total"] = sum(v for k, v in counts.items() if k != "per_layer")
    counts["non_embedding"] = counts["total"] - counts["position_embedding"]  # as nanoGPT reports it
    counts["matmul"] = L * (attn - b * (2 * c + 2 * kv) + (n_mlp_in + 1) * c * h) + V * c  # weights that multiply
    return counts


def profile_model(
    config: ModelConfig, batch_size: int = 1, seq_len: int | None = None, *, dtype: str = "bfloat16"
) -> dict[str, Any]:
    """Parameters, FLOPs per token and per step, and memory (weights, KV cache, training activations) for
    `batch_size` sequences of `seq_len` tokens (default block_size), with tensors in `dtype`."""
    seq_len = config.block_size if seq_len is None else seq_len
    check_int("batch_size", batch_size, 1)
    check_int("seq_len", seq_len, 1, config.block_size, note=" (block_size)")
    check_choice("dtype", dtype, sorted(_DTYPE_BYTES))
    nbytes = _DTYPE_BYTES[dtype]
    params = param_counts(config)
    c, L, V = config.n_embd, config.n_layer, config.vocab_size
    tokens = batch_size * seq_len

    attn_flops = 4 * L * seq_len * c  # QK^T and AV, forward, per token
    forward = 2 * params["matmul"] + attn_flops
    flops = {
        "forward_per_token": forward,
        "training_per_token": 3 * forward,
        "attention_per_token": attn_flops,
        "forward_per_step": forward * tokens,
        "training_per_step": 3 * forward * tokens,
    }

    kv_per_token = 2 * L * config.kv_dim * nbytes  # K and V, every layer
    h_mlp = config.hidden_dim * (3 if config.mlp == "swiglu" else 2)  # gate, up, product / up, gelu
    # Per layer and token: block input, norm output, q/k/v, attention output, norm_2 input and output, MLP
    # hiddens (in dtype), softmax log-sum-exp per head (fp32), dropout masks (1 byte) where dropout is on.
    act_layer = (6 * c + 2 * config.kv_dim + h_mlp) * nbytes + 4 * config.n_head + (2 * c if config.dropout else 0)
    act_head = 2 * c * nbytes + V * (nbytes + 4)  # final norm in/out, logits and their fp32 softmax
    memory = {
        "dtype": dtype,
        "weights_bytes": params["total"] * nbytes,
        "weights_bytes_float32": params["total"] * 4,
        "kv_cache_bytes_per_token": kv_per_token,
        "kv_cache_bytes": kv_per_token * tokens,
        "activation_bytes_per_token_per_layer": act_layer,
        "activation_bytes": tokens * (L * act_layer + act_head),
    }
    return {
        "config": config.to_dict(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "params": params,
        "flops": flops,
        "memory": memory,
    }


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _bytes(n: float) -> str:
    for scale, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} B"


def format_profile(d: dict[str, Any]) -> str:
    """A plain-text table of `profile_model` output, for people."""
    cfg, p, f, m = d["config"], d["params"], d["flops"], d["memory"]
    rows = [
        (
            "architecture",
            f"{cfg['n_layer']} layers, {cfg['n_head']} heads ({cfg['n_kv_head']} KV), "
            f"{cfg['n_embd']} wide, context {cfg['block_size']}, vocab {cfg['vocab_size']}",
        ),
        (
            "flavour",
            f"{cfg['norm']}, {cfg['pos']} positions, {cfg['mlp']} MLP, bias={cfg['bias']}, "
            f"tied={cfg['tie_weights']}, dropout={cfg['dropout']}",
        ),
        ("parameters", f"{_human(p['total'])} ({p['total']:,}); non-embedding {_human(p['non_embedding'])}"),
        (
            "  embeddings",
            f"token {_human(p['token_embedding'])}, position {_human(p['position_embedding'])}, "
            f"LM head {_human(p['lm_head']) if p['lm_head'] else 'tied'}",
        ),
        (
            "  per layer",
            f"{_human(p['per_layer'])} (attention {_human(p['attention'] / cfg['n_layer'])}, "
            f"MLP {_human(p['mlp'] / cfg['n_layer'])})",
        ),
        ("batch x seq_len", f"{d['batch_size']} x {d['seq_len']}"),
        ("FLOPs/token fwd", f"{_human(f['forward_per_token'])} (attention {_human(f['attention_per_token'])})"),
        ("FLOPs/token train", _human(f["training_per_token"])),
        ("FLOPs/step train", _human(f["training_per_step"])),
        (f"weights ({m['dtype']})", f"{_bytes(m['weights_bytes'])} (float32 {_bytes(m['weights_bytes_float32'])})"),
        ("KV cache", f"{_bytes(m['kv_cache_bytes'])} ({_bytes(m['kv_cache_bytes_per_token'])}/token)"),
        ("activations (train)", _bytes(m["activation_bytes"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
