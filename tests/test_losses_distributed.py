"""Two real gloo processes must reproduce the single-process losses and gradients of loss_msclip on the global batch.

One spawn runs every case on both ranks (a tiny linear "encoder" wrapped in DistributedDataParallel, so the
gradients are averaged over ranks exactly as in training) and saves the results; the tests then compare them with
the same computation done here in one process on the concatenated batch.
"""

import math
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import assert_close_to_scale, free_port
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from modeling_msclip.loss_msclip import (
    ClipLoss,
    NClipHead,
    NClipLoss,
    SigLipLoss,
    check_finite_loss,
    gather_features,
    get_rank_and_world_size,
)

pytestmark = pytest.mark.slow

WORLD_SIZE = 2
LOCAL_BATCH = 3
IN_DIM, EMBED_DIM, NUM_PROTOTYPES = 5, 4, 7
TOLERANCE = 1e-5
SPAWN_TIMEOUT_S = 120

CLIP_CASES = {
    "clip_local_loss_gather_with_grad": {"local_loss": True, "gather_with_grad": True},
    "clip_full_gather_with_grad": {"local_loss": False, "gather_with_grad": True},
    "clip_full_gather_without_grad": {"local_loss": False, "gather_with_grad": False},
}
CASES = [*CLIP_CASES, "siglip", "nclip"]


class TinyPairModel(nn.Module):
    """Linear image/text 'encoders' plus the loss parameters, so DDP averages every gradient we compare."""

    def __init__(self, case: str):
        super().__init__()
        torch.manual_seed(1234)
        self.image = nn.Linear(IN_DIM, EMBED_DIM)
        self.text = nn.Linear(IN_DIM, EMBED_DIM)
        # Only parameters the case uses: DDP requires every parameter to receive a gradient.
        if case == "nclip":
            self.image_head = NClipHead(EMBED_DIM, hidden_dim=6, bottleneck_dim=3, num_prototypes=NUM_PROTOTYPES)
            self.text_head = NClipHead(EMBED_DIM, hidden_dim=6, bottleneck_dim=3, prototypes=self.image_head.prototypes)
            # The heads' std-0.02 init suits widths ~2048; at width 6 it shrinks the MLP output to ~1e-5 before the
            # L2 norm, whose 1/||v|| then drives the bias gradients to ~1e5 (an ill-conditioned case whose float32
            # rounding depends on the CPU). He init keeps every gradient below ~10.
            for head in (self.image_head, self.text_head):
                for layer in head.mlp:
                    if isinstance(layer, nn.Linear):
                        nn.init.normal_(layer.weight, std=math.sqrt(2.0 / layer.in_features))
        else:
            self.logit_scale = nn.Parameter(torch.tensor([math.log(10.0)]))
            self.logit_bias = nn.Parameter(torch.tensor([-2.0])) if case == "siglip" else None

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        image, text = self.image(x), self.text(y)
        if hasattr(self, "image_head"):
            return self.image_head(image), self.text_head(text)
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1), self.logit_scale, self.logit_bias


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    x = torch.randn(WORLD_SIZE * LOCAL_BATCH, IN_DIM, generator=generator)
    y = x + 0.3 * torch.randn(WORLD_SIZE * LOCAL_BATCH, IN_DIM, generator=generator)
    return x, y


def run_case(case: str) -> dict:
    """Loss, gradients and extras of one case for this process's share of the global batch."""
    rank, world_size = get_rank_and_world_size()
    x, y = _global_batch()
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH) if world_size > 1 else slice(None)
    model = TinyPairModel(case)
    wrapped = DistributedDataParallel(model) if world_size > 1 else model
    result: dict = {}
    if case == "nclip":
        loss_fn = NClipLoss(
            num_prototypes=NUM_PROTOTYPES, center_momentum=0.5, lambda_sharp=0.3, lambda_smooth=1.0
        ).train()
        output = loss_fn(*wrapped(x[rows], y[rows]))
        loss = output.total
        result["terms"] = {name: value.detach().clone() for name, value in vars(output).items()}
        result["center"] = loss_fn.center.clone()
    else:
        image, text, logit_scale, logit_bias = wrapped(x[rows], y[rows])
        if case == "siglip":
            loss = SigLipLoss()(image, text, logit_scale, logit_bias)
        else:
            loss = ClipLoss(**CLIP_CASES[case])(image, text, logit_scale)
    loss.backward()
    result["loss"] = loss.item()
    result["grads"] = {name: p.grad.clone() for name, p in model.named_parameters()}
    return result


def _gather_features_probe() -> dict:
    """Gradients reaching the local shard when rank r weights every gathered row by (r + 1)."""
    rank, _ = get_rank_and_world_size()
    probe: dict = {}
    for with_grad in (True, False):
        local = torch.full((2, 3), float(rank), requires_grad=True)
        gathered = gather_features(local, with_grad=with_grad)
        (gathered * (rank + 1)).sum().backward()
        probe[with_grad] = {"values": gathered.detach().clone(), "local_grad": local.grad.clone()}
    return probe


def _error_message(fn) -> str | None:
    try:
        fn()
    except (ValueError, FloatingPointError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        results = {case: run_case(case) for case in CASES}
        results["gather_probe"] = _gather_features_probe()
        # Rank 0 alone sees a NaN term: both ranks must reach the same verdict.
        terms = {"clip": torch.tensor(1.0), "nclip_pred": torch.tensor(float("nan") if rank == 0 else 0.5)}
        results["finite_skip"] = check_finite_loss(terms, "skip")
        results["finite_raise"] = _error_message(lambda: check_finite_loss(terms, "raise"))
        uneven = torch.randn(LOCAL_BATCH - rank, EMBED_DIM)
        results["uneven"] = _error_message(lambda: ClipLoss()(uneven, uneven, torch.zeros(1)))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("loss_ranks")
    context = mp.start_processes(
        _worker, args=(WORLD_SIZE, free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"gloo workers did not finish within {SPAWN_TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_results() -> dict:
    assert get_rank_and_world_size() == (0, 1)
    return {case: run_case(case) for case in CASES}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    assert_close_to_scale(actual, expected, TOLERANCE, what)


@pytest.mark.parametrize("case", CASES)
def test_rank_averaged_gradients_equal_single_process(case, rank_results, single_results):
    expected = single_results[case]["grads"]
    for rank, results in enumerate(rank_results):
        grads = results[case]["grads"]
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            _assert_close(grad, expected[name], f"{case} rank {rank} grad of {name}")


@pytest.mark.parametrize("case", CASES)
def test_rank_mean_of_loss_equals_single_process(case, rank_results, single_results):
    losses = [results[case]["loss"] for results in rank_results]
    expected = single_results[case]["loss"]
    assert sum(losses) / WORLD_SIZE == pytest.approx(expected, rel=TOLERANCE, abs=TOLERANCE)
    if case in ("clip_full_gather_with_grad", "clip_full_gather_without_grad"):
        # The full N x N modes return the global loss itself on every rank.
        assert losses == pytest.approx([expected] * WORLD_SIZE, rel=TOLERANCE, abs=TOLERANCE)
    else:
        # Local rows: each rank returns its own share, which differs between ranks.
        assert abs(losses[0] - losses[1]) > 1e-4


def test_nclip_global_terms_diagnostics_and_centre_equal_single_process(rank_results, single_results):
    expected = single_results["nclip"]
    global_terms = [name for name in expected["terms"] if name not in ("total", "pred", "sharp")]
    for rank, results in enumerate(rank_results):
        for name in global_terms:
            _assert_close(results["nclip"]["terms"][name], expected["terms"][name], f"nclip rank {rank} {name}")
        _assert_close(results["nclip"]["center"], expected["center"], f"nclip rank {rank} centre")
    for name in ("total", "pred", "sharp"):
        mean = sum(results["nclip"]["terms"][name] for results in rank_results) / WORLD_SIZE
        _assert_close(mean, expected["terms"][name], f"nclip rank-mean of {name}")
    assert expected["center"].abs().sum() > 0


def test_gather_features_routes_gradients(rank_results):
    for rank, results in enumerate(rank_results):
        probe = results["gather_probe"]
        for with_grad in (True, False):
            expected_values = torch.cat([torch.full((2, 3), float(r)) for r in range(WORLD_SIZE)])
            assert torch.equal(probe[with_grad]["values"], expected_values)
        # With grad: every rank's weight (r + 1) on this rank's rows is summed back to the owner: 1 + 2 = 3.
        assert torch.equal(probe[True]["local_grad"], torch.full((2, 3), 3.0))
        # Without grad: only this rank's own weight reaches its shard.
        assert torch.equal(probe[False]["local_grad"], torch.full((2, 3), float(rank + 1)))


def test_non_finite_verdict_is_shared_by_all_ranks(rank_results):
    assert [results["finite_skip"] for results in rank_results] == [False, False]
    assert "['nclip_pred'] on this rank" in rank_results[0]["finite_raise"]
    assert "another rank" in rank_results[1]["finite_raise"]
    assert all(results["finite_raise"].startswith("FloatingPointError") for results in rank_results)


def test_uneven_local_batches_raise_on_every_rank(rank_results):
    for results in rank_results:
        assert results["uneven"] is not None and "same local batch size" in results["uneven"]
        assert "[3, 2]" in results["uneven"]
