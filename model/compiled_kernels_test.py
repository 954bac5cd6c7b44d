"""Under torch.compile, model.layers runs our kernels as custom ops (kernels.compile_ops) where a `use_kernels` scope
switches them on (the trainer's kernels=true), and plain PyTorch otherwise: the compiled model is one graph (no
break), holds the ops exactly then, recompiles when the scope changes, and gives the loss and gradients of the plain
model (no dropout) or of the eager kernel path with the same dropout masks (same torch seed).

On CPU the ops run through Triton's interpreter (`_compiled_op_device` patched: on their own they serve CUDA only),
compiled with backend="aot_eager" (AOTAutograd's forward and backward graphs, run eagerly) and once with Inductor;
the GPU tests compile as the trainer does (reduce-overhead: CUDA graphs, bf16 autocast)."""

import contextlib

import pytest
import torch

from kernels import fused_add_norm
from kernels.compile_ops_test import one_config_each
from model import layers
from model.presets import get_preset
from model.testing import assert_grads_close, perturb_like_training
from model.transformer import GPT

GPU = torch.cuda.is_available()
FLAVOURS = {  # head dims 16 and 32: sizes the flash kernel takes
    "llama-gqa": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, n_head=4, n_kv_head=2),
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu", bias=True, n_head=2, n_kv_head=2),
}
VOCAB, T, ROWS = 48, 32, 2
OPS = ("tinylm.flash_attention_fwd.default", "tinylm.add_norm_fwd.default")
cpu_only = pytest.mark.skipif(GPU, reason="forces Triton's CPU interpreter; the GPU tests below run the real kernels")


def model_for(flavour: str, device: str, attention_dropout: float = 0.0, n_layer: int = 2, **shape) -> GPT:
    """A model moved away from its init (`perturb_like_training`); dropout only on the attention probabilities, where
    the flash kernel draws it."""
    torch.manual_seed(0)
    shape = {"n_embd": 64, **FLAVOURS[flavour], **shape}
    config = get_preset("tiny", n_layer=n_layer, block_size=T, vocab_size=VOCAB, dropout=0.0, **shape)
    with torch.no_grad():
        model = perturb_like_training(GPT(config)).to(device)
    for block in model.blocks:
        block.attn.dropout = attention_dropout
    return model


def batch(device: str, rows: int = ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, VOCAB, (2, rows, T), generator=g)
    return idx.to(device), targets.to(device)


def loss_and_grads(model, forward, idx, targets, torch_seed: int = 5, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(torch_seed)  # the dropout seeds the kernels draw
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        _, loss = forward(idx, targets)
    loss.backward()
    return loss.item(), {name: p.grad.float().clone() for name, p in model.named_parameters()}


class GraphRecorder:
    """A torch.compile backend that keeps each graph dynamo hands it (and runs it through aot_eager)."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    def ops(self, graph: int = -1) -> list[str]:
        """Our custom ops called in a recorded graph, in order."""
        return [str(n.target) for n in self.graphs[graph].graph.nodes if str(n.target).startswith("tinylm.")]


@pytest.fixture(autouse=True)
def _one_config_each_on_gpu(monkeypatch):
    """On a GPU, the flash kernels tune over one config each and the add + norm kernels take their default config:
    the configs do not change results (their own tests run each), and tuning every one costs minutes of compiling."""
    if GPU:
        one_config_each(monkeypatch)


@pytest.fixture
def ops_on_cpu(monkeypatch):
    monkeypatch.setattr(layers, "_compiled_op_device", lambda t: True)
    monkeypatch.setattr(fused_add_norm, "AUTOTUNE", False)


def eager_kernels(monkeypatch):
    """The eager kernel path (Triton's interpreter on CPU) for the kernels with a custom op, where a scope says so."""
    real = layers._kernel_impl

    def impl(t, kernel):
        if torch.compiler.is_compiling():
            return real(t, kernel)
        return "triton" if kernel in layers.COMPILED_KERNELS and layers._KERNELS_ON.get() else None

    monkeypatch.setattr(layers, "_kernel_impl", impl)


@cpu_only
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_compiled_model_runs_the_ops_with_the_plain_models_loss_and_grads(flavour, ops_on_cpu):
    model = model_for(flavour, "cpu")
    idx, targets = batch("cpu")
    with layers.use_kernels(False):
        ref_loss, ref_grads = loss_and_grads(model, model, idx, targets)
    recorder = GraphRecorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)  # fullgraph: a graph break raises
    with layers.use_kernels(True):
        loss, grads = loss_and_grads(model, compiled, idx, targets)
    n_layer = model.config.n_layer
    # per block: attention, then two fused adds + norms (the last into norm_f)
    assert recorder.ops() == [OPS[0], OPS[1], OPS[1]] * n_layer, recorder.ops()
    assert abs(loss - ref_loss) < 1e-5, (loss, ref_loss)
    assert_grads_close(grads, ref_grads, 1e-4)


@cpu_only
def test_the_scope_decides_and_a_change_recompiles(ops_on_cpu):
    """Off (and outside any scope: the defaults do not apply under compile) no op is traced; a scope that switches a
    kernel on makes dynamo's guard fail and the new graph holds that op; leaving it goes back to the plain graph."""
    model = model_for("gpt2", "cpu").eval()
    idx, _ = batch("cpu")
    recorder = GraphRecorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    with torch.no_grad():
        compiled(idx)
        assert recorder.ops() == []
        with layers.use_kernels(False):
            compiled(idx)
        with layers.use_kernels(add_norm=True):
            compiled(idx)
            assert recorder.ops() == [OPS[1]] * 4, recorder.ops()
            with layers.use_kernels(False, flash_attention=True):
                compiled(idx)
                assert recorder.ops() == [OPS[0]] * 2, recorder.ops()
        compiled(idx)  # the first graph again: no recompilation
    assert len(recorder.graphs) == 3, len(recorder.graphs)


def test_the_compile_switch_follows_the_scopes():
    assert layers._COMPILED_ON == ()
    with layers.use_kernels(True):
        assert layers._COMPILED_ON == layers.COMPILED_KERNELS
        with layers.use_kernels(flash_attention=False):
            assert layers._COMPILED_ON == ("add_norm",)
            with layers.use_kernels(False, add_norm=True, swiglu=True):
                assert layers._COMPILED_ON == ("add_norm",)
        with contextlib.suppress(RuntimeError), layers.use_kernels(False):
            raise RuntimeError  # left by an exception: restored all the same
        assert layers._COMPILED_ON == layers.COMPILED_KERNELS
    assert layers._COMPILED_ON == ()


@cpu_only
@pytest.mark.parametrize("flavour", ["llama-gqa"])  # GQA and RMSNorm; the Inductor test below takes gpt2
def test_compiled_dropout_draws_the_masks_of_the_eager_kernels(flavour, ops_on_cpu, monkeypatch):
    """Attention dropout through the op: with the same torch seed, the compiled model's seeds (drawn in the graph)
    are those the eager kernels draw, so the loss and gradients match exactly; another seed gives other masks."""
    model = model_for(flavour, "cpu", attention_dropout=0.3)
    idx, targets = batch("cpu")
    eager_kernels(monkeypatch)
    with layers.use_kernels(True):
        ref_loss, ref_grads = loss_and_grads(model, model, idx, targets)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        loss, grads = loss_and_grads(model, compiled, idx, targets)
        other_loss, other_grads = loss_and_grads(model, compiled, idx, targets, torch_seed=6)
    assert abs(loss - ref_loss) < 1e-5, (loss, ref_loss)
    assert_grads_close(grads, ref_grads, 1e-4)
    assert other_grads["blocks.0.attn.q_proj.weight"].sub(grads["blocks.0.attn.q_proj.weight"]).norm() > 1e-3 * (
        grads["blocks.0.attn.q_proj.weight"].norm()
    ), "another seed, the same masks"
    assert other_loss != loss


@cpu_only
def test_inductor_compiled_model_with_dropout_matches_the_eager_kernels(ops_on_cpu, monkeypatch):
    """Inductor itself (C++ on CPU) around the ops; fallback_random makes its randint torch's, so the seeds match."""
    model = model_for("gpt2", "cpu", attention_dropout=0.3, n_layer=1)
    idx, targets = batch("cpu")
    eager_kernels(monkeypatch)
    # config.patch, not monkeypatch: monkeypatch's undo deleted the entry, which hides it from every later compile and
    # torch.export in the worker ("torch._inductor.config.fallback_random does not exist")
    with layers.use_kernels(True), torch._inductor.config.patch(fallback_random=True):
        ref_loss, ref_grads = loss_and_grads(model, model, idx, targets)
        compiled = torch.compile(model, fullgraph=True)
        loss, grads = loss_and_grads(model, compiled, idx, targets)
    assert abs(loss - ref_loss) < 1e-5, (loss, ref_loss)
    assert_grads_close(grads, ref_grads, 1e-4)


# head dim 64, as shakespeare-char's
GPU_SHAPES = {"gpt2": dict(n_embd=384, n_head=6, n_kv_head=6), "llama-gqa": dict(n_embd=256, n_head=4, n_kv_head=2)}


def _gpu_model(flavour: str, attention_dropout: float = 0.0) -> GPT:
    return model_for(flavour, "cuda", attention_dropout, n_layer=3, **GPU_SHAPES[flavour])


def replays(model: GPT, kernels: bool, idx, targets, torch_seeds) -> list[tuple[float, dict]]:
    """(loss, grads) of training steps of `model` compiled as the trainer compiles it (reduce-overhead: CUDA graphs;
    bf16 autocast), kernels on or off; the first two are warm-up and recording, the others replays."""
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with layers.use_kernels(kernels):
        return [loss_and_grads(model, compiled, idx, targets, seed, autocast=True) for seed in torch_seeds]


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: the compiled step's CUDA graphs")
@pytest.mark.parametrize("flavour", ["gpt2"])  # the trainer's (each compile costs ~20 s; the CPU tests take both)
def test_gpu_reduce_overhead_with_kernels_matches_without(flavour):
    """As the trainer compiles (reduce-overhead, bf16 autocast), no dropout: kernels on vs off, a few replays each."""
    model = _gpu_model(flavour)
    idx, targets = batch("cuda", rows=8)
    with layers.use_kernels(True):
        graphs = torch._dynamo.explain(model)(idx, targets).graphs
    traced = [str(n.target) for g in graphs for n in g.graph.nodes if str(n.target).startswith("tinylm.")]
    assert len(graphs) == 1 and traced == [OPS[0], OPS[1], OPS[1]] * 3, (len(graphs), traced)
    results = {on: replays(model, on, idx, targets, torch_seeds=[5] * 4) for on in (False, True)}
    for runs in results.values():
        assert all(abs(r[0] - runs[-1][0]) < 1e-6 for r in runs), [r[0] for r in runs]  # replays agree
    (loss, grads), (ref_loss, ref_grads) = results[True][-1], results[False][-1]
    assert abs(loss - ref_loss) < 1e-2 * ref_loss, (loss, ref_loss)
    assert_grads_close(grads, ref_grads, 3e-2)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: the compiled step's CUDA graphs")
def test_gpu_reduce_overhead_dropout_masks_are_fresh_in_every_replay():
    """Replays of the same batch drop different probabilities (different losses), and their mean loss is that of
    the plain compiled model with SDPA's dropout, within bf16's difference and the spread of the masks (each replay's
    exact mask is checked at the op: kernels/compile_ops_test.py)."""
    model = _gpu_model("gpt2", attention_dropout=0.3)
    idx, targets = batch("cuda", rows=8)
    means = {}
    for on in (False, True):
        losses = torch.tensor([loss for loss, _ in replays(model, on, idx, targets, torch_seeds=range(12))])
        assert len(set(losses[2:].tolist())) == 10, f"kernels {on}: replays repeat a mask: {losses}"
        means[on] = (losses.mean(), losses.std())
    (mean, std), (ref_mean, ref_std) = means[True], means[False]
    # bf16 alone moves the loss by up to 1% between the paths (the test above); the masks' spread adds to it
    assert abs(mean - ref_mean) < 1e-2 * ref_mean + 4 * max(std, ref_std) / 12**0.5, (means,)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: a captured CUDA graph")
def test_gpu_captured_eager_forward_draws_fresh_masks_in_every_replay():
    """An eager model captured whole (as trainer.step_graph captures its step) with the kernels on: attention takes
    the op there, whose seed is drawn on the device, so replays do not repeat the capture's mask."""
    model = _gpu_model("gpt2", attention_dropout=0.3)
    idx, targets = batch("cuda", rows=8)
    with layers.use_kernels(True), torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up (and autotuning) outside the capture
                model(idx, targets)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _, loss = model(idx, targets)
    losses = []
    for _ in range(5):
        graph.replay()
        losses.append(loss.item())
    assert len(set(losses)) == len(losses), f"replays repeat a mask: {losses}"
