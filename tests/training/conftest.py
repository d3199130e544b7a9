"""Two gloo worker processes, started once for the package: each runs the per-rank checks of
test_losses (InfoNCE, DDP, GradCache), test_objectives (SupCon, debiased InfoNCE, triplet, the
queue in the loss) and test_queue_simcse (the queue's all-gather) in one process group, and the tests compare what they return with one process on the whole batch."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    from tests.training import test_losses, test_objectives, test_queue_simcse

    torch.set_num_threads(1)
    store = torch.distributed.FileStore(store_path, test_losses.WORLD)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=test_losses.WORLD,
                                         timeout=timedelta(seconds=60))
    out = {**test_losses.on_worker(rank), "objectives": test_objectives.on_worker(rank),
           "queue": test_queue_simcse.on_worker(rank)}
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="package")
def two_workers(tmp_path_factory) -> list[dict]:
    from tests.training.test_losses import WORLD

    tmp = tmp_path_factory.mktemp("dist")
    torch.multiprocessing.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]
