"""The engine's sampler: a seeded row draws the same tokens whatever shares its batch, and never an id the
tokenizer cannot decode."""

from __future__ import annotations

import queue

import torch

from inference_svc.detokenizer import StreamingDetokenizer
from inference_svc.params import Request
from inference_svc.sampler import Sampler
from inference_svc.sequence import Sequence
from model.sampling import SamplingParams, sample
from model.tokenizers import ByteTokenizer


def _seq(sampler: Sampler, params: SamplingParams) -> Sequence:
    request = Request(prompt_ids=(1, 2, 3), params=params)
    return Sequence(
        request,
        StreamingDetokenizer(ByteTokenizer()),
        sampler.generator(params.seed),
        queue.SimpleQueue(),
        seed=params.seed or 0,
    )


def test_seeded_rows_do_not_depend_on_their_batch():
    sampler = Sampler("cpu")
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=42)
    logits = torch.randn(6, 3, 256, generator=torch.Generator().manual_seed(0))  # 6 steps, 3 rows
    alone, batched = _seq(sampler, params), _seq(sampler, params)
    others = [_seq(sampler, SamplingParams(temperature=1.0, seed=s)) for s in (1, 2)]
    for step in range(6):
        (a,) = sampler.sample(logits[step, :1].clone(), [alone])
        batch = torch.stack([logits[step, 1], logits[step, 0], logits[step, 2]])  # row 0's logits in the middle
        b = sampler.sample(batch, [others[0], batched, others[1]])[1]
        expected = int(sample(logits[step, :1].clone(), [params], [42], [alone.length])[0])
        assert a == b == expected
        for seq in (alone, batched, *others):  # the next draw is for the next position
            seq.output_ids.append(0)


def test_repetition_penalty_sees_prompt_and_output():
    sampler = Sampler("cpu")
    seq = _seq(sampler, SamplingParams(temperature=0.0, repetition_penalty=10.0))
    logits = torch.zeros(1, 256)
    logits[0, 2], logits[0, 7] = 5.0, 1.0  # token 2 is in the prompt: 5 / 10 < 1
    assert sampler.sample(logits, [seq]) == [7]
    seq.output_ids.append(7)
    logits[0, 7], logits[0, 9] = 5.0, 0.9
    assert sampler.sample(logits, [seq]) == [9]


def test_padded_vocabulary_ids_are_never_sampled():
    sampler = Sampler("cpu", vocab_size=250)
    logits = torch.zeros(2, 256)
    logits[:, 253] = 100.0  # a padded id would win
    logits[:, 17] = 1.0
    seqs = [_seq(sampler, SamplingParams(temperature=0.0)), _seq(sampler, SamplingParams(temperature=1.0, seed=3))]
    tokens = sampler.sample(logits, seqs)
    assert tokens[0] == 17 and tokens[1] < 250
