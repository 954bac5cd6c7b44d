"""Two gloo ranks (torch.multiprocessing) train exactly like one process with the same global batch."""

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from trainer import distributed as dist
from trainer.distributed import DistInfo, dist_from_env
from trainer.testing import fast_config, write_small_corpus
from trainer.train import train

_CONFIG = dict(max_steps=3, batch_size=8, grad_accum=2, eval_interval=3, dropout=0.0)


def _rank_main(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    root_path = Path(root)
    info = DistInfo(rank=rank, local_rank=rank, world_size=world, init_method=f"file://{root}/rendezvous")
    result = train(fast_config(**_CONFIG), root_path / "corpus.txt", store_root=root_path / "store",
                   run_dir=root_path / "ddp", data_dir=root_path / "data", info=info)  # fmt: skip
    dist.destroy_process_group(info)
    out = {"losses": result.losses, "grad_norms": result.grad_norms, "model_id": result.model_id}
    (root_path / f"rank{rank}.json").write_text(json.dumps(out))


def test_two_ranks_match_one_process(tmp_path):
    write_small_corpus(tmp_path / "corpus.txt")
    mp.spawn(_rank_main, args=(2, str(tmp_path)), nprocs=2, join=True)
    single = train(fast_config(**_CONFIG), tmp_path / "corpus.txt", store_root=tmp_path / "store1",
                   run_dir=tmp_path / "single", data_dir=tmp_path / "data")  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the logged loss is the mean over ranks
    assert ranks[0]["grad_norms"] == pytest.approx(single.grad_norms, rel=1e-5)
    assert ranks[0]["losses"] == pytest.approx(single.losses, rel=1e-5)
    assert ranks[0]["model_id"] and ranks[1]["model_id"] is None  # rank 0 alone writes the artifact
    ddp_w = load_file(tmp_path / "ddp/resume/model.safetensors")
    one_w = load_file(tmp_path / "single/resume/model.safetensors")
    for name, w in one_w.items():
        torch.testing.assert_close(ddp_w[name], w, rtol=1e-4, atol=1e-6)


def test_dist_from_env():
    assert dist_from_env({}).world_size == 1
    info = dist_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (2, 0, 4, False)
    with pytest.raises(ValueError, match="rank"):
        DistInfo(rank=4, world_size=4)
