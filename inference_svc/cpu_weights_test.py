"""TorchRunner's CPU weights (`cpu_weights`: fp32, bf16, int8): each decodes greedily exactly as its own model's plain
full forward does (requests joining at different steps, so rows sit at different positions in one batch), its logits
stay close to the fp32 model's, and a bad value is refused with the allowed ones named. Weights are moved away from
their init as training would (`perturb_like_training`), on a GPT-2-flavoured model (shakespeare-char's shape, smaller)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from inference_svc.cpu_weights import CPU_WEIGHTS, INT8PACK_K_MULTIPLE, CompiledDecodeStep, CpuInt8Linear
from inference_svc.runner import TorchRunner
from kernels.quant_format import unpack_int8
from model.presets import get_preset
from model.quantize import Int8Linear
from model.sampling import SamplingParams
from model.testing import perturb_like_training, single_thread
from model.transformer import GPT

VOCAB, BLOCK = 65, 96
GREEDY = SamplingParams(max_new_tokens=64, temperature=0.0)
# Relative logit error ||logits - fp32 logits|| / ||fp32 logits|| and top-1 agreement with fp32 over 4 x 80 teacher-forced
# positions (3 seeds measured: bf16 0.7-0.8% and 98.8-99.1%, int8 1.1-1.4% and 96.9-99.1%); bounds with some room.
MAX_REL_ERROR = {"fp32": 1e-5, "bf16": 0.015, "int8": 0.025}
MIN_TOP1_AGREEMENT = {"fp32": 1.0, "bf16": 0.95, "int8": 0.93}


def trained_like(seed: int = 0, sharp: bool = False) -> GPT:
    """shakespeare-char's flavour (LayerNorm, learned positions, GELU, biases, tied head) at 2 layers of width 64,
    weights moved off their init. `sharp`: the final norm's weight scaled by 8, so greedy choices are clear (the
    moved weights give logits of std ~0.5 and top-2 gaps of ~0.15, where a bf16 rounding could pick either)."""
    torch.manual_seed(seed)
    config = get_preset("shakespeare-char", n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, block_size=BLOCK)
    model = perturb_like_training(GPT(config.replace(dropout=0.0)), seed).eval()
    if sharp:
        with torch.no_grad():
            model.norm_f.weight.mul_(8.0)
    return model


def reference_greedy(model: GPT, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens from the plain full forward over the whole sequence at each step (no KV cache)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].float().argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("weights", CPU_WEIGHTS)
def test_greedy_decode_equals_its_own_model_over_40_steps_with_requests_joining(weights):
    """Three requests join at steps 0, 5 and 11 (prompts of 9, 3 and 17 tokens) and decode 40 tokens each, batched
    with whoever is running, through the engine's device-resident calls (prefill_sample, decode_sample)."""
    model = trained_like(seed=1, sharp=True)
    with single_thread():
        runner = TorchRunner(copy.deepcopy(model), n_slots=4, cpu_weights=weights)
        g = torch.Generator().manual_seed(2)
        joins = {0: (2, 9), 5: (0, 3), 11: (3, 17)}  # step -> (slot, prompt length)
        prompts = {slot: torch.randint(0, VOCAB, (n,), generator=g).tolist() for slot, n in joins.values()}
        steps, got = 40, {slot: [] for slot in prompts}
        length = {}  # slot -> tokens in its cache
        for step in range(max(joins) + steps):
            if step in joins:
                slot, _ = joins[step]
                first = runner.prefill_sample([slot], [prompts[slot]], [GREEDY], [0])
                got[slot].append(int(first[0]))
                length[slot] = len(prompts[slot])
            running = [s for s in length if len(got[s]) < steps]
            if not running:
                break
            new = runner.decode_sample(running, max(length[s] for s in running) + 1, full=False)
            for s, token in zip(running, new.tolist()):
                got[s].append(token)
                length[s] += 1
        for slot, prompt in prompts.items():
            assert got[slot] == reference_greedy(runner.model, prompt, steps), f"slot {slot} ({weights})"


@pytest.mark.parametrize("weights", CPU_WEIGHTS)
def test_logits_stay_close_to_the_fp32_model(weights):
    model = trained_like(seed=0)
    ids = torch.randint(0, VOCAB, (4, 80), generator=torch.Generator().manual_seed(0))
    runner = TorchRunner(copy.deepcopy(model), n_slots=4, cpu_weights=weights)
    with single_thread(), torch.inference_mode():
        want = model(ids)[0]  # (4, 80, V) fp32
        got = runner.extend([0, 1, 2, 3], ids.tolist(), [0] * 4, all_logits=True)  # the cached path, every position
    rel = float((got - want).norm() / want.norm())
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    assert rel <= MAX_REL_ERROR[weights], f"{weights}: relative logit error {rel:.4f}"
    assert agree >= MIN_TOP1_AGREEMENT[weights], f"{weights}: top-1 agreement {agree:.3f}"
    if weights != "fp32":
        assert rel > 1e-4  # the weights really are the narrower type


def test_int8_runs_on_a_quantized_copy_and_leaves_the_model_as_it_was():
    model = trained_like()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = TorchRunner(model, n_slots=2, cpu_weights="int8")
    linears = [m for m in runner.model.modules() if isinstance(m, (nn.Linear, Int8Linear))]
    assert linears and all(type(m) is CpuInt8Linear for m in linears)  # the LM head too
    assert runner.model.tok_emb.weight.dtype == torch.float32 and runner.cache.k.dtype == torch.float32
    assert all(type(m) is not CpuInt8Linear for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_int8_qkv_is_one_kernel_call_giving_each_projection_its_own_output():
    """fuse_qkv joins the three CpuInt8Linear projections (one kernel call in the cached path); a change to a part's
    int8 weights makes the joined copy stale (the separate projections are used again)."""
    runner = TorchRunner(trained_like(), n_slots=2, cpu_weights="int8")
    attn = runner.model.blocks[0].attn
    fused = attn._fused_qkv()
    assert type(fused) is CpuInt8Linear and fused.out_features == 3 * 64
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        want = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
        torch.testing.assert_close(fused(x), want, rtol=1e-6, atol=1e-6)
        attn.k_proj.q[0, 0] += 1
    assert attn._fused_qkv() is None


@pytest.mark.parametrize("k", [INT8PACK_K_MULTIPLE * 3, 24])  # the fused kernel; K it cannot take (dequantised)
def test_cpu_int8_linear_equals_the_dequantised_product(k):
    """x (rounded to bf16, as the kernel takes it) @ dequant(q, scale).T + bias, within the bf16 rounding of the
    result (and of the scales)."""
    torch.manual_seed(0)
    linear = nn.Linear(k, 40)
    m = CpuInt8Linear.from_linear(linear)
    x = torch.randn(2, 3, k)
    y = m(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    w = unpack_int8(m.q, m.scale)
    if k % INT8PACK_K_MULTIPLE == 0:
        x = x.bfloat16().float()
        w = unpack_int8(m.q, m.scale.bfloat16().float())
    want = x @ w.T + linear.bias.detach()
    torch.testing.assert_close(y, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    if k % INT8PACK_K_MULTIPLE:
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)  # Int8Linear's own path: exact up to fp32


def _greedy_one_row(runner: TorchRunner, prompt: list[int], steps: int) -> list[int]:
    """One request alone (batch 1) through prefill_sample and `steps` decode_sample calls."""
    got = [int(runner.prefill_sample([1], [prompt], [GREEDY], [0])[0])]
    for j in range(steps):
        got.append(int(runner.decode_sample([1], len(prompt) + j + 1, full=False)[0]))
    return got


@pytest.mark.parametrize("weights", ["int8", "fp32"])
def test_compiled_decode_step_gives_the_eager_steps_tokens_and_cache(weights):
    """`cpu_compile` (on by default with int8): batch-1 decode steps run as one compiled graph that reads the cache
    and writes every layer's new K/V after it. Greedy tokens over 40 steps equal the eager step's token for token
    (and the plain full forward's), and the cache holds the same keys and values at every written position."""
    model = trained_like(seed=3, sharp=True)
    g = torch.Generator().manual_seed(4)
    prompt, steps = torch.randint(0, VOCAB, (7,), generator=g).tolist(), 40
    with single_thread():
        compiled = TorchRunner(copy.deepcopy(model), n_slots=3, cpu_weights=weights, cpu_compile=True)
        eager = TorchRunner(copy.deepcopy(model), n_slots=3, cpu_weights=weights, cpu_compile=False)
        assert compiled.cpu_compile and not eager.cpu_compile and eager._compiled_step is None
        got, want = _greedy_one_row(compiled, prompt, steps), _greedy_one_row(eager, prompt, steps)
    assert compiled._compiled_step.calls == steps  # every decode step took the compiled graph
    assert got == want
    assert got == reference_greedy(compiled.model, prompt, steps + 1)
    n = len(prompt) + steps  # positions written: the prompt's (prefill, eager in both) and each step's
    for buf in ("k", "v"):
        a, b = getattr(compiled.cache, buf)[1, :, :, :n], getattr(eager.cache, buf)[1, :, :, :n]
        assert a.abs().min(-1).values.max() > 0  # written
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not compiled.cache.k[[0, 2]].any() and not compiled.cache.k[1, :, :, n:].any()  # nothing else written


def test_int8_compiles_batch_1_steps_by_default_and_leaves_larger_batches_eager():
    runner = TorchRunner(trained_like(), n_slots=2, cpu_weights="int8")
    assert runner.cpu_compile and TorchRunner(trained_like(), n_slots=2).cpu_compile is False
    with single_thread():
        runner.prefill_sample([0, 1], [[1, 2, 3], [4, 5]], [GREEDY] * 2, [0, 0])
        runner.decode_sample([0, 1], 4, full=False)
    assert runner._compiled_step.calls == 0


def test_a_compiled_step_that_fails_to_build_leaves_the_eager_step(monkeypatch, caplog):
    def fail(self, cache, slot):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(CompiledDecodeStep, "warm", fail)
    runner = TorchRunner(trained_like(), n_slots=2, cpu_weights="int8")
    assert runner._compiled_step is None and runner.cpu_compile is False
    assert "failed to build (no C++ compiler); decoding eagerly" in caplog.text
    with single_thread():
        runner.prefill_sample([0], [[1, 2, 3]], [GREEDY], [0])
        assert runner.decode_sample([0], 4, full=False).shape == (1,)


def test_a_bad_value_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"cpu_weights must be one of \['fp32', 'bf16', 'int8'\], got 'int4'"):
        TorchRunner(trained_like(), n_slots=2, cpu_weights="int4")
    with pytest.raises(ValueError, match=r"cpu_weights='bf16' runs the model in bf16; dtype must be None or bf16"):
        TorchRunner(trained_like(), n_slots=2, cpu_weights="bf16", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"cpu_compile must be None, True or False, got 'yes'"):
        TorchRunner(trained_like(), n_slots=2, cpu_compile="yes")


def test_cpu_weights_are_refused_on_cuda():
    """Refused before the model moves (so this runs without a GPU too)."""
    with pytest.raises(ValueError, match="cpu_weights='int8' needs a CPU device"):
        TorchRunner(trained_like(), n_slots=2, device="cuda", cpu_weights="int8")
    with pytest.raises(ValueError, match="cpu_compile needs a CPU device"):
        TorchRunner(trained_like(), n_slots=2, device="cuda", cpu_compile=True)
