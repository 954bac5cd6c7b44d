"""How to train: one frozen, validated dataclass, per-preset defaults, YAML files and `key=value` overrides.

`batch_size` counts sequences per optimizer step across every rank and micro-step (as the TrainSpec proto
says); `grad_accum` is the number of micro-steps per optimizer step over all ranks together, as nanoGPT's
`gradient_accumulation_steps` (each of W ranks runs grad_accum / W of them). A bad value raises
`ConfigError` (a ValueError) naming the key and the allowed values or range.

`compile_mode` picks torch.compile's mode ('none' runs eager). The older boolean `compile` is still accepted in
YAML, overrides and `replace()` (true -> 'default', false -> 'none'), and `config.compile` reads as a bool.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from model.field_checks import (
    FieldError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    int_message,
    is_number,
    number_message,
)
from model.presets import PRESETS as MODEL_PRESETS

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TRAIN_PRESETS",
    "TOKENIZERS",
    "DTYPES",
    "DECAYS",
    "COMPILE_MODES",
    "CUDA_GRAPH_MODES",
    "ANNEALS",
    "OPTIMIZERS",
    "COMPILE_SCOPES",
    "EVAL_MODES",
    "load_config",
    "parse_overrides",
    "apply_overrides",
    "micro_batch_plan",
]

TOKENIZERS = ("char", "byte", "bpe")
DTYPES = ("float32", "bfloat16", "float16")
DECAYS = ("cosine", "linear", "constant", "trapezoid")
# reduce-overhead-tuned: reduce-overhead (CUDA graphs) with Inductor's coordinate-descent tuning of the kernels it
# generates (each reduction / pointwise kernel's launch config benchmarked at compile time; matmuls stay cuBLAS,
# unlike max-autotune, which also searches Triton GEMM templates and compiles for minutes). Measured on the H200
# (22c6c91): its compile took 232 s for shakespeare-char and the 60 s benchmark budget ended before its first step,
# so it is no road to issue 16's start-up or time-to-loss targets; kept as an option.
COMPILE_MODES = ("none", "default", "reduce-overhead", "reduce-overhead-tuned", "max-autotune")
# reduce-overhead and its tuned form: CUDA-graph trees, whose new iterations the loop marks (cudagraph_mark_step_begin)
CUDA_GRAPH_MODES = ("reduce-overhead", "reduce-overhead-tuned")
ANNEALS = ("linear", "cosine")
OPTIMIZERS = ("adamw", "muon")
COMPILE_SCOPES = ("model", "blocks")
# sampled: nanoGPT's estimate, eval_iters random windows of each split through the training forward; val-full: every
# token of the val split scored once (trainer.evaluate.split_loss) by the eager model, and the train loss over
# eval_iters windows: exact, and ~30x fewer tokens than 200 sampled batches of each split (no eval graph to compile)
EVAL_MODES = ("sampled", "val-full")

# Inclusive numeric ranges; an upper bound only stops the obvious typo (an extra zero or three).
_INT_RANGES: dict[str, tuple[int, int]] = {
    "max_steps": (1, 10_000_000),
    "batch_size": (1, 1 << 20),
    "block_size": (0, 1 << 20),  # 0: the model preset's block_size
    "grad_accum": (1, 1 << 16),
    "warmup": (0, 10_000_000),
    "decay_steps": (0, 10_000_000),  # 0: max_steps
    "warmdown_steps": (0, 10_000_000),  # decay="trapezoid" only: the final linear decay's length
    "eval_interval": (1, 10_000_000),
    "eval_iters": (1, 100_000),
    "checkpoint_interval": (0, 10_000_000),
    "log_interval": (1, 10_000_000),
    "seed": (0, 2**63 - 1),
    "early_stop_patience": (0, 1_000_000),  # evaluations without a better val loss; 0: never stop early
    "dropout_anneal_steps": (0, 10_000_000),  # 0: max_steps
    "dropout_anneal_levels": (0, 1000),  # 0: automatic; else >= 2
    "bpe_vocab": (256, 1 << 20),
}
_FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "lr": (0.0, 10.0),  # > 0 (_OPEN_BELOW)
    "min_lr": (0.0, 10.0),
    "weight_decay": (0.0, 10.0),
    "grad_clip": (0.0, 1e6),  # 0: no clipping
    "dropout": (0.0, 0.99),
    "dropout_start": (0.0, 0.99),
    "dropout_end": (0.0, 0.99),
    "muon_lr": (0.0, 10.0),
    "muon_momentum": (0.0, 0.9999),
    "muon_weight_decay": (0.0, 10.0),
    "ema_decay": (0.0, 0.99999),
    "input_noise": (0.0, 0.99),
}
_OPEN_BELOW = ("lr", "muon_lr")  # ranges (lo, hi] rather than [lo, hi]
_OPTIONAL = ("dropout", "dropout_start")  # None: "the preset's" / "no annealing"
_CHOICES: dict[str, tuple[str, ...]] = {
    "tokenizer": TOKENIZERS, "dtype": DTYPES, "decay": DECAYS, "compile_mode": COMPILE_MODES, "dropout_anneal": ANNEALS,
    "optimizer": OPTIMIZERS, "compile_scope": COMPILE_SCOPES, "eval_mode": EVAL_MODES,
}  # fmt: skip
_BOOLS = ("grad_checkpointing", "resume", "tensorboard", "kernels", "compile_optimizer")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ConfigError(FieldError):
    """A config value is out of range or unknown; `key` (also `field`) names it."""

    def __init__(self, key: str, message: str):
        super().__init__(key, message)
        self.key = key


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs besides the corpus and where to put results."""

    preset: str = "tiny"  # model preset (model.presets)
    name: str = ""  # artifact name; empty: the preset's name
    tokenizer: str = "char"
    bpe_vocab: int = 4096  # target vocabulary of a BPE tokenizer trained on the corpus
    max_steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step, all ranks and micro-steps together
    block_size: int = 0  # context length; 0: the model preset's
    grad_accum: int = 1  # micro-steps per optimizer step, all ranks together
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    decay: str = "cosine"  # cosine | linear | constant | trapezoid (constant after warmup, then a linear warmdown)
    decay_steps: int = 0  # steps over which lr decays to min_lr; 0: max_steps
    warmdown_steps: int = 0  # trapezoid: lr falls linearly to min_lr over the last warmdown_steps of decay_steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    # adamw: AdamW for every parameter (nanoGPT). muon: Muon (trainer.muon) for the blocks' 2-D matrices at muon_lr,
    # AdamW at lr for embeddings, head, norms and biases; both follow the same schedule (lr / config.lr).
    optimizer: str = "adamw"
    muon_lr: float = 0.02
    muon_momentum: float = 0.95  # Nesterov momentum
    muon_weight_decay: float = 0.0  # decoupled, on the Muon matrices
    dropout: float | None = None  # None: the model preset's
    # Dropout annealing: from dropout_start to dropout_end over dropout_anneal_steps (trainer.dropout_schedule).
    dropout_start: float | None = None  # None: no annealing (`dropout` throughout); else it replaces `dropout`
    dropout_end: float = 0.0
    dropout_anneal_steps: int = 0  # 0: max_steps
    dropout_anneal: str = "linear"  # linear | cosine
    dropout_anneal_levels: int = 0  # distinct p values; 0: every step's own in eager, 5 under torch.compile
    # training inputs only: each token, with this probability, replaced by the token at a random position of the train
    # split (a draw from its unigram distribution: data noising, Xie et al. 2017); targets and evaluations untouched
    input_noise: float = 0.0
    eval_interval: int = 250
    eval_iters: int = 20
    eval_mode: str = "sampled"  # sampled | val-full (EVAL_MODES)
    # Steps between writes of the resume state (model, optimizer, RNG: ~130 MB for shakespeare-char with Muon) and of
    # the best weights, made at the evaluation that falls on one; in between, improved best weights wait in a device
    # copy. 0: both at every evaluation. The loop's end writes any waiting best weights, and a cancelled run saves
    # its state where it stopped, whatever this says.
    checkpoint_interval: int = 0
    # An exponential moving average of the weights, ema = decay * ema + (1 - decay) * weights after every optimizer
    # step (inside the captured step where there is one); evaluations, the best checkpoint and the published model
    # use the average. 0: off. 0.99 averages over ~100 steps.
    ema_decay: float = 0.0
    log_interval: int = 10
    dtype: str = "float32"
    compile_mode: str = "none"  # none | default | reduce-overhead | reduce-overhead-tuned | max-autotune
    # What torch.compile compiles: "model", the whole forward as one graph (the most fusion, the longest compile), or
    # "blocks", each transformer Block on its own (regional compilation: every layer runs the same code, so dynamo
    # traces and Inductor compiles one block once and reuses it for all; embedding, final norm, head and loss run
    # eagerly). Only under torch.compile (compile_mode other than none).
    compile_scope: str = "model"
    # Compile the gradient clipping and the optimizer step too (trainer.optimizer_step; AdamW and Muon), in the
    # run's compile_mode (default when compile_mode is none): under reduce-overhead they replay as CUDA graphs.
    # Not with step_graph (which captures them already) nor float16 (its loss scaler decides on the host).
    compile_optimizer: bool = False
    grad_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    # Run model.layers' ops on kernels/ (CUDA). Eager: every kernel, each on its Triton launcher; eager
    # shakespeare-char trained at 587k tokens/s with them and 714k without (H200, 2026-11-29,
    # bench_svc/results/train-nvidia-h200.csv). Under torch.compile (the presets' default): flash attention (with its
    # dropout) and the fused residual + norm as custom ops inside the compiled step and its CUDA graphs
    # (kernels.compile_ops), Inductor's fusion for the rest; false: Inductor's fusion for everything. Off by default
    # until the benchmark's tinylm-kernels vs tinylm figure says otherwise.
    kernels: bool = False
    # Only these kernels on (comma-separated names of model.layers.KERNELS, e.g. "flash_attention"), every other one
    # off: kernels on vs off one at a time (the benchmark's tinylm-flash). Empty: as `kernels` says; set, it needs
    # kernels=false.
    kernel_names: str = ""
    # Capture the whole step (forward, backward, clipping, the optimizer) as one CUDA graph (trainer.step_graph), the
    # model eager or compiled without CUDA graphs of its own (compile_mode none or default); needs CUDA, one process,
    # grad_accum 1, no dropout annealing, no fp16. true: always (a run where it cannot fails, naming why); auto: where
    # the run allows it, else the loop steps as without it (the log says which and why); false: never.
    step_graph: bool | str = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 1337
    early_stop_patience: int = 0
    log_dir: str = ""  # run folder (logs, resume state, best checkpoint); empty: the caller picks one
    resume: bool = False  # continue from the resume state in the run folder, when there is one
    tensorboard: bool = True

    def __post_init__(self) -> None:
        check_choice("preset", self.preset, sorted(MODEL_PRESETS), error=ConfigError)
        for key, (lo, hi) in _INT_RANGES.items():
            check_int(key, getattr(self, key), lo, hi, error=ConfigError)
        for key, (lo, hi) in _FLOAT_RANGES.items():
            value = getattr(self, key)
            if key in _OPTIONAL and value is None:
                continue
            value = check_number(key, value, lo, hi, lo_open=key in _OPEN_BELOW, error=ConfigError)
            object.__setattr__(self, key, value)
        for key, choices in _CHOICES.items():
            check_choice(key, getattr(self, key), choices, error=ConfigError)
        for key in _BOOLS:
            check_bool(key, getattr(self, key), error=ConfigError)
        if not (isinstance(self.step_graph, bool) or self.step_graph == "auto"):
            raise ConfigError("step_graph", f"step_graph must be true, false or auto, got {self.step_graph!r}")
        betas = self.betas
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(is_number(b) and 0.0 <= b < 1.0 for b in betas)
        ):
            raise ConfigError("betas", f"betas must be two numbers in [0, 1), like 0.9,0.99, got {betas!r}")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        if self.min_lr > self.lr:
            raise ConfigError("min_lr", f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.batch_size % self.grad_accum != 0:
            raise ConfigError(
                "grad_accum", f"grad_accum must divide batch_size={self.batch_size}, got {self.grad_accum}"
            )
        self._check_schedule()
        self._check_compiled_step()
        if self.dropout_anneal_levels == 1:
            raise ConfigError(
                "dropout_anneal_levels", "dropout_anneal_levels must be 0 (automatic) or an integer in [2, 1000], got 1"
            )
        if not isinstance(self.device, str) or not _valid_device(self.device):
            raise ConfigError("device", f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        self._check_kernel_names()
        for key in ("name", "log_dir"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(key, f"{key} must be a string, got {getattr(self, key)!r}")

    def _check_kernel_names(self) -> None:
        if not isinstance(self.kernel_names, str):
            raise ConfigError("kernel_names", f"kernel_names must be a string, got {self.kernel_names!r}")
        names = self.kernel_list
        if not names:
            return
        from model.layers import KERNELS  # torch: only when names are given

        unknown = [n for n in names if n not in KERNELS]
        if unknown:
            raise ConfigError(
                "kernel_names", f"kernel_names: unknown kernel(s) {', '.join(unknown)}; allowed: {', '.join(KERNELS)}"
            )
        if self.kernels:
            raise ConfigError("kernel_names", "kernel_names turns on only the kernels it names: set kernels=false")

    @property
    def kernel_list(self) -> tuple[str, ...]:
        """The names in `kernel_names` (empty: none given)."""
        return tuple(n.strip() for n in self.kernel_names.split(",") if n.strip())

    @property
    def kernel_switches(self) -> tuple[bool, dict[str, bool]]:
        """`model.layers.use_kernels` arguments for this run: every kernel on / off, and the named ones on over that."""
        return self.kernels, {name: True for name in self.kernel_list}

    def _check_schedule(self) -> None:
        if self.decay != "trapezoid":
            if self.warmdown_steps:
                raise ConfigError(
                    "warmdown_steps",
                    f"warmdown_steps applies to decay=trapezoid only (decay={self.decay!r}); set it to 0",
                )
            return
        room = self.lr_decay_steps - self.warmup
        if room < 1:  # no step left after the warmup: no warmdown length can fit
            raise ConfigError(
                "warmup",
                f"warmup must be below decay_steps or max_steps ({self.lr_decay_steps}) with decay=trapezoid, so the "
                f"warmdown has steps to run, got warmup {self.warmup}",
            )
        if not 1 <= self.warmdown_steps <= room:
            raise ConfigError(
                "warmdown_steps",
                f"warmdown_steps must be an integer in [1, {room}] with decay=trapezoid (decay_steps or max_steps "
                f"{self.lr_decay_steps} - warmup {self.warmup}), got {self.warmdown_steps}",
            )

    def _check_compiled_step(self) -> None:
        if not self.compile_optimizer:
            return
        if self.step_graph:
            raise ConfigError(
                "compile_optimizer",
                f"compile_optimizer must be false with step_graph={str(self.step_graph).lower()} (the captured step "
                "holds the optimizer already)",
            )
        if self.dtype == "float16":
            raise ConfigError(
                "compile_optimizer",
                "compile_optimizer needs dtype float32 or bfloat16 (float16's loss scaler steps on the host), "
                "got float16",
            )

    @property
    def model_name(self) -> str:
        """The artifact's human name."""
        return self.name or self.preset

    @property
    def compile(self) -> bool:
        """Whether the model runs under torch.compile (any compile_mode but 'none')."""
        return self.compile_mode != "none"

    @property
    def anneals_dropout(self) -> bool:
        """Whether dropout follows the dropout_start -> dropout_end schedule."""
        return self.dropout_start is not None

    @property
    def lr_decay_steps(self) -> int:
        """Steps over which the learning rate decays (decay_steps, or max_steps when 0)."""
        return self.decay_steps or self.max_steps

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (validated again); `compile=<bool>` sets compile_mode."""
        return dataclasses.replace(self, **_compile_alias(changes))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (JSON/YAML safe; betas as a list)."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def to_yaml(self, path: str | Path) -> None:
        """Write the config as a flat YAML mapping."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _compile_alias(values: dict[str, Any]) -> dict[str, Any]:
    """`compile: true|false` (the key before compile_mode existed) -> `compile_mode: default|none`."""
    if "compile" not in values:
        return values
    values = dict(values)
    raw = values.pop("compile")
    text = raw.strip().lower() if isinstance(raw, str) else None
    if not isinstance(raw, bool) and text not in _TRUE + _FALSE:
        raise ConfigError("compile", f"compile must be true or false (or use compile_mode), got {raw!r}")
    mode = "default" if raw is True or text in _TRUE else "none"
    if values.get("compile_mode", mode) != mode:
        raise ConfigError(
            "compile", f"compile={raw!r} contradicts compile_mode={values['compile_mode']!r}; give compile_mode only"
        )
    values["compile_mode"] = mode
    return values


def _valid_device(device: str) -> bool:
    if device in ("auto", "cpu", "cuda", "mps"):
        return True
    return device.startswith("cuda:") and device[5:].isdigit()


_NANOGPT_CHAR = dict(
    tokenizer="char", max_steps=5000, batch_size=64, block_size=256, lr=1e-3, min_lr=1e-4, warmup=100,
    betas=(0.9, 0.99), weight_decay=0.1, grad_clip=1.0, dropout=0.2, eval_interval=250, eval_iters=200,
    dtype="bfloat16", compile_mode="default", step_graph="auto", kernel_names="add_norm",
)  # fmt: skip
# How it steps, each measured fastest on an H200 against the alternatives in the same run (2026-11-30,
# bench_svc/results/train-nvidia-h200-cgraph2.*, trainer/PERF_NOTES.md section 13): the whole step (forward,
# backward, clipping, AdamW) one CUDA graph around the torch.compile'd model (compile_mode default + step_graph):
# 2.49M tokens/s against 2.23M for reduce-overhead's CUDA-graph trees, whose Python per step made the step
# host-bound; with our fused residual + LayerNorm kernel inside it (kernel_names add_norm) 2.87M, 1.155x the same
# step without. On a CPU (or wherever a capture cannot run) step_graph=auto steps without the capture, and the
# kernels are GPU-only.

TRAIN_PRESETS: dict[str, TrainConfig] = {
    # Seconds on a CPU: a 4-layer 128-wide Llama-style model on characters.
    "tiny": TrainConfig(
        preset="tiny", tokenizer="char", max_steps=1000, batch_size=16, block_size=64, lr=3e-3, min_lr=3e-4,
        warmup=20, eval_interval=100, eval_iters=20, dtype="float32", compile_mode="none",
    ),
    # nanoGPT's config/train_shakespeare_char.py, step for step.
    "shakespeare-char": TrainConfig(preset="shakespeare-char", **_NANOGPT_CHAR),
    # The same model, data split and evaluation on a schedule cut to the time budget: the learning rate decays to
    # min_lr over 2,500 steps instead of 5,000 (nanoGPT's run is best at step 1,750 and overfits after it).
    "shakespeare-char-fast": TrainConfig(
        preset="shakespeare-char", **{**_NANOGPT_CHAR, "max_steps": 2500, "lr": 1.5e-3, "min_lr": 1.5e-4}
    ),
    # modded-nanogpt's recipe on the same data, split and evaluation: Muon for the blocks' matrices (AdamW for the
    # embeddings, head, norms, biases), a trapezoid schedule (warmup, flat, linear warmdown to 0), QK-norm, ReLU², an
    # untied head (model preset shakespeare-char-muon). A first guess, not yet measured: see trainer/PERF_NOTES.md.
    "shakespeare-char-muon": TrainConfig(
        preset="shakespeare-char-muon", **{**_NANOGPT_CHAR, "max_steps": 2000, "optimizer": "muon", "muon_lr": 0.03,
        "lr": 2e-3, "min_lr": 0.0, "decay": "trapezoid", "warmdown_steps": 1000},
    ),
    "small": TrainConfig(
        preset="small", tokenizer="bpe", bpe_vocab=4096, max_steps=5000, batch_size=64, block_size=256,
        lr=1e-3, min_lr=1e-4, warmup=100, eval_interval=250, eval_iters=100, dtype="bfloat16", compile_mode="default",
    ),
    "medium": TrainConfig(
        preset="medium", tokenizer="bpe", bpe_vocab=8192, max_steps=5000, batch_size=64, grad_accum=2,
        block_size=512, lr=6e-4, min_lr=6e-5, warmup=200, betas=(0.9, 0.95), eval_interval=250, eval_iters=100,
        dtype="bfloat16", compile_mode="default",
    ),
    "large": TrainConfig(
        preset="large", tokenizer="bpe", bpe_vocab=16384, max_steps=10000, batch_size=64, grad_accum=4,
        block_size=1024, lr=3e-4, min_lr=3e-5, warmup=500, betas=(0.9, 0.95), eval_interval=500, eval_iters=100,
        dtype="bfloat16", compile_mode="default",
    ),
    # nanoGPT's GPT-2 124M recipe (batch 480 x 1024 as 40 micro-batches of 12), shortened to a corpus-sized run.
    "gpt2-124m": TrainConfig(
        preset="gpt2-124m", tokenizer="bpe", bpe_vocab=50257, max_steps=5000, batch_size=480, grad_accum=40,
        block_size=1024, lr=6e-4, min_lr=6e-5, warmup=200, betas=(0.9, 0.95), eval_interval=250, eval_iters=200,
        dtype="bfloat16", compile_mode="default",
    ),
}  # fmt: skip
# The best whole-split val loss within 60 s of launch on one H200 (issue 16's target, <= 1.45): the Muon recipe over
# 2,400 steps with the weights' moving average evaluated (exactly, on the whole val split, every 100 steps), dropout
# 0.15 and 10% of the training inputs noised with the split's unigram draws (Xie et al. 2017). Measured (H200, 2026-11-30,
# bench_svc/results/train-nvidia-h200-speed-noise.* and train-nvidia-h200.*): 1.4407-1.4451 over five in-process runs
# and 1.4419 / 1.4460 from two new processes' launches, against 1.4520-1.4597 for the same schedule at dropout 0.25
# without the noise in the same runs (1.4563-1.4647 in earlier sessions). `train --preset shakespeare-char-60s`.
TRAIN_PRESETS["shakespeare-char-60s"] = TRAIN_PRESETS["shakespeare-char-muon"].replace(
    max_steps=2400, warmdown_steps=1200, eval_mode="val-full", eval_interval=100, eval_iters=4,
    checkpoint_interval=2400, ema_decay=0.995, dropout=0.15, input_noise=0.1,
)  # fmt: skip
# the Muon recipe on the same parameter budget spent deeper and narrower (model presets of the same names)
TRAIN_PRESETS.update({
    name: TRAIN_PRESETS["shakespeare-char-muon"].replace(preset=name)
    for name in ("shakespeare-char-muon-l8", "shakespeare-char-muon-l10")
})  # fmt: skip

_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, raw: Any, current: Any) -> Any:
    """Turn a YAML or command-line value into the type of field `key` (whose current value is `current`)."""
    if key not in _FIELDS:
        raise ConfigError(key, f"unknown config key {key!r}; allowed: {sorted(_FIELDS)}")
    if not isinstance(raw, str):
        return tuple(raw) if key == "betas" and isinstance(raw, list) else raw
    text = raw.strip()
    try:
        if key == "betas":
            return tuple(float(b) for b in text.strip("()[]").split(","))
        if key in _OPTIONAL:
            return None if text.lower() in ("", "none", "null") else float(text)
        if key == "step_graph" and text.lower() == "auto":
            return "auto"
        if key in _BOOLS or key == "step_graph":
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError(text)
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            return text
        if isinstance(current, int):
            value = float(text)
            return int(value) if value.is_integer() else value  # 5e3 -> 5000; 2.5 fails validation
        return float(text)
    except ValueError:
        raise _unparsable(key, raw) from None


def _unparsable(key: str, raw: Any) -> ConfigError:
    """The same message validation gives, for a value that does not even parse."""
    if key in _INT_RANGES:
        return ConfigError(key, int_message(key, raw, *_INT_RANGES[key]))
    if key in _FLOAT_RANGES:
        return ConfigError(key, number_message(key, raw, *_FLOAT_RANGES[key], lo_open=key in _OPEN_BELOW))
    if key in _BOOLS:
        return ConfigError(key, f"{key} must be true or false, got {raw!r}")
    if key == "step_graph":
        return ConfigError(key, f"step_graph must be true, false or auto, got {raw!r}")
    return ConfigError(key, f"{key} must be two numbers in [0, 1), like 0.9,0.99, got {raw!r}")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`["lr=3e-4", "compile_mode=none"]` -> `{"lr": "3e-4", "compile_mode": "none"}`; keys are checked later."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(item, f"override {item!r} must look like key=value; keys: {sorted(_FIELDS)}")
        out[key.strip()] = value
    return out


def load_config(
    preset: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """The preset's TrainConfig, then a YAML file's keys, then `overrides`, validated once at the end.

    The preset comes from `preset`, else the YAML's `preset` key, else the overrides' `preset`, else "tiny".
    """
    values: dict[str, Any] = {}
    if yaml_path is not None:
        loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError("config", f"config file {str(yaml_path)!r} must hold a mapping of key: value")
        values.update(_compile_alias(loaded))
    values.update(_compile_alias(overrides or {}))
    name = preset or values.get("preset") or "tiny"
    check_choice("preset", name, sorted(TRAIN_PRESETS), error=ConfigError)
    base = TRAIN_PRESETS[name]
    return apply_overrides(base, {**values, "preset": base.preset})  # the model preset a training preset names


def apply_overrides(config: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """`config` with `values` (strings as on the command line, or YAML values) coerced to each field's type and
    validated; an unknown key or a bad value -> ConfigError naming it."""
    changes = {key: _coerce(key, raw, getattr(config, key, None)) for key, raw in values.items()}
    try:
        return config.replace(**changes)
    except TypeError as err:  # a YAML value of the wrong shape (a mapping where a number goes)
        raise ConfigError("config", f"bad config value: {err}") from err


def micro_batch_plan(batch_size: int, grad_accum: int, world_size: int) -> tuple[int, int]:
    """(sequences per micro-batch on one rank, micro-steps per optimizer step on one rank).

    Ranks split the micro-steps (grad_accum // world_size each, at least one); the batch must divide evenly.
    """
    accum = max(1, grad_accum // world_size)
    if grad_accum >= world_size and grad_accum % world_size != 0:
        raise ConfigError("grad_accum", f"grad_accum={grad_accum} must be a multiple of the world size {world_size}")
    if batch_size % (accum * world_size) != 0:
        raise ConfigError(
            "batch_size",
            f"batch_size={batch_size} must be a multiple of world_size x micro-steps = {world_size} x {accum}",
        )
    return batch_size // (accum * world_size), accum
