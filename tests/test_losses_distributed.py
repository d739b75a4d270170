"""Real gloo process groups (2 and 3 ranks) must reproduce the single-process losses and gradients of loss_msclip.

One spawn per world size runs every case on every rank (a tiny linear "encoder" wrapped in DistributedDataParallel,
so the gradients are averaged over ranks exactly as in training) and saves the results; the tests then compare them
with the same computation done here in one process on the concatenated batch. The 2-process spawn also records the
warnings of those runs (no deprecated collective may warn) and runs every loss a second time under ``torch.compile``
(forward and backward graphs through AOTAutograd), which must give the same numbers with the collectives inside the
compiled graphs.
"""

import math
import os
import time
import warnings
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
    xclip_loss,
)

pytestmark = pytest.mark.slow

WORLD_SIZES = (2, 3)
COMPILE_WORLD_SIZE = 2  # the world whose workers also run every case under torch.compile
GLOBAL_BATCH = 6
IN_DIM, EMBED_DIM, NUM_PROTOTYPES = 5, 4, 7
TOLERANCE = 1e-5
SPAWN_TIMEOUT_S = 300

CLIP_CASES = {
    "clip_local_loss_gather_with_grad": {"local_loss": True, "gather_with_grad": True},
    "clip_full_gather_with_grad": {"local_loss": False, "gather_with_grad": True},
    "clip_full_gather_without_grad": {"local_loss": False, "gather_with_grad": False},
}
CASES = [*CLIP_CASES, "siglip", "nclip", "xclip"]
NCLIP_CASES = ("nclip", "xclip")
# Collectives the compiled graphs must contain (Dynamo rewrites the in-place c10d calls of loss_msclip to these).
GATHER_OP, REDUCE_SCATTER_OP, ALL_REDUCE_OP = "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"
EXPECTED_COMPILED_COLLECTIVES = {
    # case: (ops in the forward graphs, ops in the backward graphs)
    "clip_local_loss_gather_with_grad": ({GATHER_OP}, {REDUCE_SCATTER_OP}),
    "clip_full_gather_with_grad": ({GATHER_OP}, {REDUCE_SCATTER_OP}),
    "clip_full_gather_without_grad": ({GATHER_OP}, set()),
    "siglip": ({GATHER_OP}, {REDUCE_SCATTER_OP}),
    "nclip": ({ALL_REDUCE_OP}, {ALL_REDUCE_OP}),
    "xclip": ({GATHER_OP, ALL_REDUCE_OP}, {REDUCE_SCATTER_OP, ALL_REDUCE_OP}),
}


class TinyPairModel(nn.Module):
    """Linear image/text 'encoders' plus the loss parameters, so DDP averages every gradient we compare."""

    def __init__(self, case: str):
        super().__init__()
        torch.manual_seed(1234)
        self.image = nn.Linear(IN_DIM, EMBED_DIM)
        self.text = nn.Linear(IN_DIM, EMBED_DIM)
        # Only parameters the case uses: DDP requires every parameter to receive a gradient.
        if case in NCLIP_CASES:
            self.image_head = NClipHead(EMBED_DIM, hidden_dim=6, bottleneck_dim=3, num_prototypes=NUM_PROTOTYPES)
            self.text_head = NClipHead(EMBED_DIM, hidden_dim=6, bottleneck_dim=3, prototypes=self.image_head.prototypes)
            # The heads' std-0.02 init suits widths ~2048; at width 6 it shrinks the MLP output to ~1e-5 before the
            # L2 norm, whose 1/||v|| then drives the bias gradients to ~1e5 (an ill-conditioned case whose float32
            # rounding depends on the CPU). He init keeps every gradient below ~10.
            for head in (self.image_head, self.text_head):
                for layer in head.mlp:
                    if isinstance(layer, nn.Linear):
                        nn.init.normal_(layer.weight, std=math.sqrt(2.0 / layer.in_features))
        if case != "nclip":
            self.logit_scale = nn.Parameter(torch.tensor([math.log(10.0)]))
        if case == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor([-2.0]))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        image, text = self.image(x), self.text(y)
        outputs = {}
        if hasattr(self, "image_head"):
            outputs["image_scores"], outputs["text_scores"] = self.image_head(image), self.text_head(text)
        if hasattr(self, "logit_scale"):
            outputs["image_embeds"], outputs["text_embeds"] = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
            outputs["logit_scale"] = self.logit_scale
        if hasattr(self, "logit_bias"):
            outputs["logit_bias"] = self.logit_bias
        return outputs


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    x = torch.randn(GLOBAL_BATCH, IN_DIM, generator=generator)
    y = x + 0.3 * torch.randn(GLOBAL_BATCH, IN_DIM, generator=generator)
    return x, y


def _loss_function(case: str):
    """``(compute, nclip)``: ``compute(outputs) -> (loss, nCLIP terms or {})`` and the NClipLoss it uses."""
    nclip = NClipLoss(num_prototypes=NUM_PROTOTYPES, center_momentum=0.5, lambda_sharp=0.3, lambda_smooth=1.0).train()

    def compute(outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms: dict[str, torch.Tensor] = {}
        if case in NCLIP_CASES:
            terms = dict(vars(nclip(outputs["image_scores"], outputs["text_scores"])))
        pair = (outputs.get("image_embeds"), outputs.get("text_embeds"), outputs.get("logit_scale"))
        if case == "nclip":
            return terms["total"], terms
        if case == "siglip":
            return SigLipLoss()(*pair, outputs["logit_bias"]), terms
        if case == "xclip":  # the default (local-rows) CLIP loss plus the nCLIP total
            return xclip_loss(ClipLoss()(*pair), terms["total"], w_clip=1.0, w_nclip=0.7), terms
        return ClipLoss(**CLIP_CASES[case])(*pair), terms

    return compute, nclip


def run_case(case: str, compile_backend=None) -> dict:
    """Loss, gradients and extras of one case for this process's share of the global batch.

    ``compile_backend``: run the loss (not the model) through ``torch.compile`` with this backend.
    """
    rank, world_size = get_rank_and_world_size()
    local_batch = GLOBAL_BATCH // world_size
    x, y = _global_batch()
    rows = slice(rank * local_batch, (rank + 1) * local_batch)
    model = TinyPairModel(case)
    wrapped = DistributedDataParallel(model) if world_size > 1 else model
    compute, nclip = _loss_function(case)
    if compile_backend is not None:
        compute = torch.compile(compute, backend=compile_backend)
    loss, terms = compute(wrapped(x[rows], y[rows]))
    loss.backward()
    result: dict = {"loss": loss.item(), "grads": {name: p.grad.clone() for name, p in model.named_parameters()}}
    if terms:
        result["terms"] = {name: value.detach().clone() for name, value in terms.items()}
        result["center"] = nclip.center.clone()
    return result


def _recording_backend(collectives: dict[str, list[str]]):
    """AOTAutograd backend that runs the graphs as traced and records the c10d ops of the forward/backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def recorder(kind: str):
        def compile_graph(graph_module, example_inputs):
            targets = (str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
            collectives[kind].extend(target for target in targets if "c10d" in target)
            return make_boxed_func(graph_module.forward)

        return compile_graph

    return aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))


def run_compiled_case(case: str) -> dict:
    import torch._dynamo

    torch._dynamo.reset()
    collectives: dict[str, list[str]] = {"forward": [], "backward": []}
    result = run_case(case, compile_backend=_recording_backend(collectives))
    result["collectives"] = collectives
    return result


def _deprecation_warnings(records: list[warnings.WarningMessage]) -> list[str]:
    """The recorded deprecation warnings raised at a line of the modeling_msclip package or naming torch.distributed."""
    found = []
    for record in records:
        message = str(record.message)
        ours = "modeling_msclip" in Path(record.filename).parts
        distributed = "torch.distributed" in message and "deprecat" in message.lower()
        if issubclass(record.category, (DeprecationWarning, FutureWarning)) and (ours or distributed):
            found.append(f"{record.category.__name__} at {record.filename}:{record.lineno}: {message}")
    return found


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
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            results = {case: run_case(case) for case in CASES}
            results["gather_probe"] = _gather_features_probe()
            if world_size == COMPILE_WORLD_SIZE:
                results["compiled"] = {case: run_compiled_case(case) for case in CASES}
            # Rank 0 alone sees a NaN term: all ranks must reach the same verdict.
            terms = {"clip": torch.tensor(1.0), "nclip_pred": torch.tensor(float("nan") if rank == 0 else 0.5)}
            results["finite_skip"] = check_finite_loss(terms, "skip")
            results["finite_raise"] = _error_message(lambda: check_finite_loss(terms, "raise"))
            # The last rank has one row fewer.
            uneven = torch.randn(GLOBAL_BATCH // world_size - (rank == world_size - 1), EMBED_DIM)
            results["uneven"] = _error_message(lambda: ClipLoss()(uneven, uneven, torch.zeros(1)))
        results["deprecations"] = _deprecation_warnings(records)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world_size: int, out_dir: Path) -> list[dict]:
    context = mp.start_processes(
        _worker, args=(world_size, free_port(), str(out_dir)), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world_size} gloo workers did not finish within {SPAWN_TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """``world_size -> per-rank results``, each world spawned once, on first use."""
    cache: dict[int, list[dict]] = {}

    def get(world_size: int) -> list[dict]:
        if world_size not in cache:
            cache[world_size] = _spawn(world_size, tmp_path_factory.mktemp(f"loss_{world_size}_ranks"))
        return cache[world_size]

    return get


@pytest.fixture(params=WORLD_SIZES, ids=lambda world_size: f"{world_size}proc")
def rank_results(request, spawned) -> list[dict]:
    return spawned(request.param)


@pytest.fixture
def compiled_results(spawned) -> list[dict]:
    return [results["compiled"] for results in spawned(COMPILE_WORLD_SIZE)]


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


def _assert_loss_matches(losses: list[float], case: str, expected: float) -> None:
    world_size = len(losses)
    assert sum(losses) / world_size == pytest.approx(expected, rel=TOLERANCE, abs=TOLERANCE)
    if case in ("clip_full_gather_with_grad", "clip_full_gather_without_grad"):
        # The full N x N modes return the global loss itself on every rank.
        assert losses == pytest.approx([expected] * world_size, rel=TOLERANCE, abs=TOLERANCE)
    else:
        # Local rows: each rank returns its own share, which differs between ranks.
        assert abs(losses[0] - losses[1]) > 1e-4


@pytest.mark.parametrize("case", CASES)
def test_rank_mean_of_loss_equals_single_process(case, rank_results, single_results):
    _assert_loss_matches([results[case]["loss"] for results in rank_results], case, single_results[case]["loss"])


def _assert_nclip_terms_match(per_rank: list[dict], expected: dict, what: str) -> None:
    global_terms = [name for name in expected["terms"] if name not in ("total", "pred", "sharp")]
    for rank, results in enumerate(per_rank):
        for name in global_terms:
            _assert_close(results["terms"][name], expected["terms"][name], f"{what} rank {rank} {name}")
        _assert_close(results["center"], expected["center"], f"{what} rank {rank} centre")
    for name in ("total", "pred", "sharp"):
        mean = sum(results["terms"][name] for results in per_rank) / len(per_rank)
        _assert_close(mean, expected["terms"][name], f"{what} rank-mean of {name}")
    assert expected["center"].abs().sum() > 0


@pytest.mark.parametrize("case", NCLIP_CASES)
def test_nclip_global_terms_diagnostics_and_centre_equal_single_process(case, rank_results, single_results):
    _assert_nclip_terms_match([results[case] for results in rank_results], single_results[case], case)


def test_gather_features_routes_gradients(rank_results):
    world_size = len(rank_results)
    for rank, results in enumerate(rank_results):
        probe = results["gather_probe"]
        for with_grad in (True, False):
            expected_values = torch.cat([torch.full((2, 3), float(r)) for r in range(world_size)])
            assert torch.equal(probe[with_grad]["values"], expected_values)
        # With grad: every rank's weight (r + 1) on this rank's rows is summed back to the owner: 1 + 2 (+ 3).
        summed_weights = world_size * (world_size + 1) / 2
        assert torch.equal(probe[True]["local_grad"], torch.full((2, 3), summed_weights))
        # Without grad: only this rank's own weight reaches its shard.
        assert torch.equal(probe[False]["local_grad"], torch.full((2, 3), float(rank + 1)))


def test_no_deprecated_collective_warns(rank_results):
    # Recorded in the workers around everything they run, compiled cases included (warnings.simplefilter("always")).
    for rank, results in enumerate(rank_results):
        assert results["deprecations"] == [], f"rank {rank}"


@pytest.mark.parametrize("case", CASES)
def test_compiled_loss_equals_single_process_with_collectives_in_the_graphs(case, compiled_results, single_results):
    expected = single_results[case]
    _assert_loss_matches([results[case]["loss"] for results in compiled_results], case, expected["loss"])
    for rank, results in enumerate(compiled_results):
        for name, grad in results[case]["grads"].items():
            _assert_close(grad, expected["grads"][name], f"compiled {case} rank {rank} grad of {name}")
        # The gathers and reductions are traced into the forward and backward graphs (no fallback to eager).
        forward_ops, backward_ops = EXPECTED_COMPILED_COLLECTIVES[case]
        collectives = results[case]["collectives"]
        for kind, expected_ops in (("forward", forward_ops), ("backward", backward_ops)):
            found = {op for op in (GATHER_OP, REDUCE_SCATTER_OP, ALL_REDUCE_OP) for t in collectives[kind] if op in t}
            assert found == expected_ops, (case, rank, kind, collectives[kind])
    if case in NCLIP_CASES:
        _assert_nclip_terms_match([results[case] for results in compiled_results], expected, f"compiled {case}")


def test_non_finite_verdict_is_shared_by_all_ranks(rank_results):
    assert [results["finite_skip"] for results in rank_results] == [False] * len(rank_results)
    assert "['nclip_pred'] on this rank" in rank_results[0]["finite_raise"]
    assert all("another rank" in results["finite_raise"] for results in rank_results[1:])
    assert all(results["finite_raise"].startswith("FloatingPointError") for results in rank_results)


def test_uneven_local_batches_raise_on_every_rank(rank_results):
    world_size = len(rank_results)
    sizes = [GLOBAL_BATCH // world_size] * (world_size - 1) + [GLOBAL_BATCH // world_size - 1]
    for results in rank_results:
        assert results["uneven"] is not None and "same local batch size" in results["uneven"]
        assert str(sizes) in results["uneven"]
