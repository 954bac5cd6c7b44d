import numpy as np
import pytest
import torch

from trainer.data import BatchLoader, WindowSampler, get_batch, prepare_data


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
    return path


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_prepare_splits_last_tenth_and_round_trips(corpus, tmp_path, kind):
    data = prepare_data(corpus, kind, tmp_path / "cache", bpe_vocab=300)
    text = corpus.read_text()
    ids = np.concatenate([np.asarray(data.train), np.asarray(data.val)])
    assert data.tokenizer.decode(ids.tolist()) == text
    assert len(data.val) == int(len(ids) * 0.1)
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    assert int(ids.max()) < data.vocab_size


def test_prepare_is_cached_and_keyed_by_content(corpus, tmp_path):
    first = prepare_data(corpus, "char", tmp_path / "cache")
    again = prepare_data(corpus, "char", tmp_path / "cache")
    assert first.folder == again.folder
    corpus.write_text(corpus.read_text() + "More text.\n")
    changed = prepare_data(corpus, "char", tmp_path / "cache")
    assert changed.folder != first.folder
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.folder.name, changed.folder.name])


def test_sampler_state_resumes_the_same_sequence():
    a = WindowSampler(1000, 16, seed=7)
    a.next_offsets(4)
    state = a.state_dict()
    expected = [a.next_offsets(4) for _ in range(3)]
    b = WindowSampler(1000, 16, seed=99)
    b.load_state_dict(state)
    got = [b.next_offsets(4) for _ in range(3)]
    assert all((e == g).all() for e, g in zip(expected, got))
    assert b.batches_drawn == 4
    assert all(0 <= o <= 1000 - 16 for o in np.concatenate(got))


def test_sampler_rejects_a_split_shorter_than_a_block():
    with pytest.raises(ValueError, match="block_size"):
        WindowSampler(10, 16, seed=0)


def test_get_batch_shifts_targets_by_one():
    data = np.arange(100, dtype=np.uint16)
    x, y = get_batch(data, np.array([0, 50]), 8, torch.device("cpu"))
    assert x.shape == y.shape == (2, 8) and x.dtype == torch.int64
    assert x[1, 0] == 50 and torch.equal(y, x + 1)


def test_batch_loader_gives_get_batchs_rows_in_the_samplers_order():
    data = np.random.default_rng(3).integers(0, 60000, size=5000).astype(np.uint16)
    sampler_a, sampler_b = WindowSampler(len(data), 32, seed=7), WindowSampler(len(data), 32, seed=7)
    resident = BatchLoader(data, 32, torch.device("cpu"), resident=True)  # the GPU path's gather, on the CPU
    assert resident.tokens is not None and BatchLoader(data, 32, torch.device("cpu")).tokens is None
    for _ in range(5):
        x, y = resident(sampler_a.next_offsets(8))
        x_ref, y_ref = get_batch(data, sampler_b.next_offsets(8), 32, torch.device("cpu"))
        assert x.dtype == torch.int64 and torch.equal(x, x_ref) and torch.equal(y, y_ref)


@pytest.mark.parametrize("resident", [True, False])  # the device path's draws (torch) and the host path's (numpy)
def test_noised_replaces_tokens_at_the_rate_asked_with_the_splits_unigram_draws(resident):
    rng = np.random.default_rng(5)
    data = np.where(rng.random(20000) < 0.8, 7, rng.integers(8, 40, 20000)).astype(np.uint16)  # 80% token 7
    loader = BatchLoader(data, 32, torch.device("cpu"), resident=resident)
    x = torch.zeros(64, 256, dtype=torch.int64)  # a token the split never holds: every change is a replacement
    got = loader.noised(x, 0.3, seed=11)
    changed = got != 0
    assert abs(changed.float().mean().item() - 0.3) < 0.02  # 16,384 draws: the standard error is ~0.004
    assert abs((got[changed] == 7).float().mean().item() - 0.8) < 0.03  # the replacements follow the split's counts
    assert torch.equal(loader.noised(x, 0.3, seed=11), got) and not torch.equal(loader.noised(x, 0.3, seed=12), got)
    assert torch.equal(loader.noised(x, 0.0, seed=11), x)
