"""Parity between the PyTorch model and an exported copy: logits, greedy decoding through the KV cache, loss.

`Reference.build` runs the PyTorch model once: logits on random and corpus prompts, a greedy continuation of
`decode_steps` tokens (through `model.forward_cached` and a `KVCache`, as the serving engine decodes), and the
loss on held-out windows. Each exported variant is then measured against it:
- max |Δlogits| on the random prompts, the corpus prompts, and every decode step;
- greedy agreement: the variant decodes teacher-forced on the reference continuation through its own KV
  cache (present -> past), and we count the steps whose argmax equals the reference token (one early
  mismatch does not make every later step disagree, so the number measures per-step fidelity);
- free-running agreement: the variant decodes greedily on its own (as served) for the same number of tokens, and
  we count the positions equal to the reference continuation; one early slip costs every later token;
- val loss on the held-out windows, and its delta to the PyTorch loss (positive = worse).
Held-out text is the tail of the corpus (`HELD_OUT_FRACTION`, the trainer's validation split); without a
corpus, text the model itself samples (seeded) stands in, and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from exporter.onnx_runner import FixedKVOnnxDecoder, OnnxDecoder, open_decoder
from model.field_checks import check_int
from model.kv_cache import KVCache
from model.transformer import GPT

__all__ = ["HELD_OUT_FRACTION", "ParitySettings", "Reference", "measure_onnx", "measure_hf", "held_out_text"]

HELD_OUT_FRACTION = 0.1  # the trainer's validation split: the last 10% of the corpus
_BATCH = 8  # rows per forward pass when scoring the held-out windows


@dataclass(frozen=True)
class ParitySettings:
    """How much to measure. Lengths are capped by the model's block_size."""

    n_prompts: int = 4  # random prompts and corpus prompts, each
    prompt_len: int = 32
    decode_prompts: int = 2
    decode_prompt_len: int = 16
    decode_steps: int = 64
    eval_window: int = 128  # tokens per val-loss window (plus one target)
    eval_tokens: int = 4096  # at most this many val-loss targets
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "n_prompts",
            "prompt_len",
            "decode_prompts",
            "decode_prompt_len",
            "decode_steps",
            "eval_window",
            "eval_tokens",
        ):
            check_int(name, getattr(self, name), 1)


def held_out_text(corpus_text: str) -> str:
    """The validation tail of a corpus (the last HELD_OUT_FRACTION of its characters)."""
    return corpus_text[-max(1, int(len(corpus_text) * HELD_OUT_FRACTION)) :]


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy of logits (N, T, V) against targets (N, T), in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(x).sum(axis=-1))
    picked = np.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
    return float((log_z - picked).mean())


def _decode_cached(
    model: GPT, prompt: torch.Tensor, steps: int, pick: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill prompt (B, P), then `steps` one-token steps through a KVCache; `pick` maps logits (B, V) -> (B,).

    Returns tokens (B, steps + 1) (the first is picked from the prefill) and the decode-step logits (B, steps, V).
    """
    B, P = prompt.shape
    cache = KVCache(B, model.config, max_len=P + steps)
    slots = torch.arange(B)
    logits = model.forward_cached(prompt, cache, slots, torch.zeros(B, dtype=torch.long))  # (B, P, V)
    tokens = [pick(logits[:, -1])]
    step_logits = []
    for t in range(steps):
        logits = model.forward_cached(tokens[-1][:, None], cache, slots, torch.full((B,), P + t))  # (B, 1, V)
        step_logits.append(logits[:, 0])
        tokens.append(pick(logits[:, 0]))
    return torch.stack(tokens, dim=1), torch.stack(step_logits, dim=1)


def _sampled_text_tokens(model: GPT, vocab: int, n_tokens: int, seq_len: int, seed: int) -> np.ndarray:
    """Stand-in held-out tokens: sequences of `seq_len` (<= block_size + 1) tokens the model samples at
    temperature 1 from random one-token prompts, concatenated."""
    g = torch.Generator().manual_seed(seed)
    n_seq = max(1, math.ceil(n_tokens / seq_len))
    prompt = torch.randint(0, vocab, (n_seq, 1), generator=g)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits[:, :vocab].float(), dim=-1)
        return torch.multinomial(probs, 1, generator=g)[:, 0]

    tokens, _ = _decode_cached(model, prompt, seq_len - 2, sample)  # 1 + (seq_len - 1) tokens
    return torch.cat([prompt, tokens], dim=1).numpy().reshape(-1)


@dataclass
class Reference:
    """What the PyTorch model produced; every variant is compared to it."""

    random_prompts: np.ndarray  # (n, T) int64
    random_logits: np.ndarray  # (n, T, V)
    corpus_prompts: np.ndarray  # (n, T)
    corpus_logits: np.ndarray  # (n, T, V)
    decode_prompts: np.ndarray  # (b, P)
    decode_tokens: np.ndarray  # (b, steps + 1): greedy continuation, the first from the prefill
    decode_logits: np.ndarray  # (b, steps, V): logits of each decode step
    eval_windows: np.ndarray  # (N, W + 1) held-out token windows
    val_loss: float
    eval_source: str

    @classmethod
    @torch.no_grad()
    def build(
        cls, model: GPT, tokenizer: Any, eval_text: str | None, settings: ParitySettings = ParitySettings()
    ) -> "Reference":
        """Run the PyTorch model (eval mode, float32, CPU). `eval_text` None: sample stand-in text."""
        model = model.float().eval()
        c = model.config
        vocab = min(tokenizer.vocab_size, c.vocab_size)
        rng = np.random.default_rng(settings.seed)
        window = min(settings.eval_window, c.block_size)
        if eval_text is not None:
            held_out = np.asarray(tokenizer.encode(eval_text), dtype=np.int64)
            source = "corpus held-out tail"
        else:
            held_out = _sampled_text_tokens(model, vocab, settings.eval_tokens + window, window + 1, settings.seed)
            source = "model samples (no corpus given)"
        if len(held_out) < window + 1:
            raise ValueError(f"held-out text has {len(held_out)} tokens; at least {window + 1} are needed")
        n_windows = max(1, min(len(held_out) // (window + 1), settings.eval_tokens // window))
        windows = held_out[: n_windows * (window + 1)].reshape(n_windows, window + 1)

        prompt_len = min(settings.prompt_len, c.block_size)
        random_prompts = rng.integers(0, vocab, (settings.n_prompts, prompt_len), dtype=np.int64)
        starts = np.linspace(0, len(held_out) - prompt_len, settings.n_prompts).astype(np.int64)
        corpus_prompts = np.stack([held_out[s : s + prompt_len] for s in starts])

        decode_len = max(1, min(settings.decode_prompt_len, c.block_size // 4))
        steps = min(settings.decode_steps, c.block_size - decode_len - 1)
        decode_prompts = np.stack([held_out[s : s + decode_len] for s in starts[: settings.decode_prompts]])
        tokens, step_logits = _decode_cached(
            model, torch.from_numpy(decode_prompts), steps, lambda logits: logits.argmax(dim=-1)
        )
        eval_logits = np.concatenate(
            [model(torch.from_numpy(windows[i : i + _BATCH, :-1]))[0].numpy() for i in range(0, len(windows), _BATCH)]
        )
        return cls(
            random_prompts=random_prompts,
            random_logits=model(torch.from_numpy(random_prompts))[0].numpy(),
            corpus_prompts=corpus_prompts,
            corpus_logits=model(torch.from_numpy(corpus_prompts))[0].numpy(),
            decode_prompts=decode_prompts,
            decode_tokens=tokens.numpy(),
            decode_logits=step_logits.numpy(),
            eval_windows=windows,
            val_loss=_log_softmax_nll(eval_logits, windows[:, 1:]),
            eval_source=source,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "val_loss": self.val_loss,
            "eval_source": self.eval_source,
            "eval_windows": int(self.eval_windows.shape[0]),
            "eval_window_tokens": int(self.eval_windows.shape[1] - 1),
            "random_prompts": list(self.random_prompts.shape),
            "corpus_prompts": list(self.corpus_prompts.shape),
            "decode_prompts": list(self.decode_prompts.shape),
            "decode_steps": int(self.decode_logits.shape[1]),
        }


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def measure_onnx(path: Path, ref: Reference, batch: int = _BATCH) -> dict[str, Any]:
    """Compare one ONNX file (either KV contract) with the reference: logits, teacher-forced greedy agreement, val
    loss."""
    decoder = open_decoder(path, threads=torch.get_num_threads())
    random_logits = decoder.prefill(ref.random_prompts)[0]
    corpus_logits = decoder.prefill(ref.corpus_prompts)[0]

    # Decode through the exported cache, feeding the reference tokens (teacher forcing).
    logits, past = decoder.prefill(ref.decode_prompts)
    steps = ref.decode_logits.shape[1]
    agree, decode_diff = 0, 0.0
    for t in range(steps):
        logits, past = decoder.step(ref.decode_tokens[:, t : t + 1], past)  # (b, 1, V)
        decode_diff = max(decode_diff, _max_abs(logits[:, 0], ref.decode_logits[:, t]))
        agree += int((logits[:, 0].argmax(axis=-1) == ref.decode_tokens[:, t + 1]).sum())
    greedy_agreement = agree / (steps * ref.decode_tokens.shape[0])
    free_running, divergence = _free_running(decoder, ref)

    chunks = [decoder.prefill(ref.eval_windows[i : i + batch, :-1])[0] for i in range(0, len(ref.eval_windows), batch)]
    val_loss = _log_softmax_nll(np.concatenate(chunks), ref.eval_windows[:, 1:])
    diffs = {
        "random": _max_abs(random_logits, ref.random_logits),
        "corpus": _max_abs(corpus_logits, ref.corpus_logits),
        "decode": decode_diff,
    }
    return {
        "max_abs_logits": max(diffs.values()),
        "max_abs_logits_by_source": diffs,
        "greedy_agreement": greedy_agreement,
        "free_running_agreement": free_running,
        "free_running_tokens": int(ref.decode_tokens.shape[1]),
        "free_running_first_divergence": divergence,
        "val_loss": val_loss,
        "val_loss_delta": val_loss - ref.val_loss,
    }


def _free_running(decoder: OnnxDecoder | FixedKVOnnxDecoder, ref: Reference) -> tuple[float, int | None]:
    """The variant decodes greedily on its own from the decode prompts, as a server would, for as many tokens as
    the reference continuation holds: the fraction of positions whose token equals the reference's, and the first
    position where any row diverges (None: none did). Unlike teacher forcing, one early slip counts for every later
    token, which is what a user of the quantised model sees."""
    logits, past = decoder.prefill(ref.decode_prompts)
    tokens = [logits[:, -1].argmax(axis=-1)]  # (b,)
    for _ in range(ref.decode_tokens.shape[1] - 1):
        logits, past = decoder.step(tokens[-1][:, None].astype(np.int64), past)  # (b, 1, V)
        tokens.append(logits[:, 0].argmax(axis=-1))
    same = np.stack(tokens, axis=1) == ref.decode_tokens  # (b, steps + 1)
    diverged = np.flatnonzero(~same.all(axis=0))
    return float(same.mean()), int(diverged[0]) if len(diverged) else None


def measure_hf(hf_dir: Path, ref: Reference) -> dict[str, Any]:
    """Load the HF folder with transformers and compare logits; {"skipped": reason} without transformers."""
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers is not installed"}
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        random_logits = model(torch.from_numpy(ref.random_prompts)).logits.numpy()
        corpus_logits = model(torch.from_numpy(ref.corpus_prompts)).logits.numpy()
    diffs = {"random": _max_abs(random_logits, ref.random_logits), "corpus": _max_abs(corpus_logits, ref.corpus_logits)}
    return {
        "max_abs_logits": max(diffs.values()),
        "max_abs_logits_by_source": diffs,
        "transformers": transformers.__version__,
    }
