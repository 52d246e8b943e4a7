"""The memory bank and nce_loss_with_memory pinned on hand-computable cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pirl.loss import EPS, NCELossWithMemory, nce_loss
from pirl.memory import MemoryBank
from pirl.schema import MemoryParams, NceLossWithMemory, NegativeSamplingParams


def make_loss(n=10, k=4, **kw) -> NCELossWithMemory:
    mem = MemoryParams(
        embedding_dim=2,
        momentum=kw.pop("momentum", 0.5),
        update_mem_on_forward=kw.pop("on_forward", True),
    )
    neg = NegativeSamplingParams(
        num_negatives=k, type=kw.pop("type", "random"), exclude_positive=kw.pop("exclude", False)
    )
    cfg = NceLossWithMemory(memory_params=mem, negative_sampling_params=neg, **kw)
    return NCELossWithMemory(cfg, n)


def test_nce_loss_hand_computed():
    s = torch.tensor([[math.log(2.0), 0.0, math.log(3.0)]])  # x = exp(s)/Z with Z = 1: [2, 1, 3]
    n = 4  # K/N = 2/4 = 0.5
    expected = -(
        math.log(2 / (2 + 0.5 + EPS))
        + math.log(0.5 / (1 + 0.5 + EPS))
        + math.log(0.5 / (3 + 0.5 + EPS))
    )
    assert nce_loss(s, torch.tensor(1.0), n).item() == pytest.approx(expected, rel=1e-6)
    # Z divides x; the loss is summed over the batch and negatives, then divided by B
    two = torch.cat([s, s])
    assert nce_loss(two, torch.tensor(1.0), n).item() == pytest.approx(expected, rel=1e-6)


def test_infonce_hand_computed():
    loss = make_loss(n=3, k=2, loss_type="cross_entropy", temperature=0.5)
    loss.memory.memory.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    loss.sample_negatives = lambda index, k: torch.tensor([[0, 1, 2]])
    v = torch.tensor([[2.0, 0.0]])  # normalised to [1, 0]: scores [1, 0, -1] / 0.5
    logits = torch.tensor([2.0, 0.0, -2.0])
    expected = -torch.log_softmax(logits, 0)[0].item()
    loss.eval()
    assert loss({"data": v}, torch.tensor([0])).item() == pytest.approx(expected, rel=1e-6)


def test_z_estimated_once_from_first_batch():
    loss = make_loss(n=10, k=4, temperature=1.0)
    loss.eval()
    v = F.normalize(torch.randn(3, 2), dim=1)
    index = torch.tensor([0, 1, 2])
    gen_state = loss.generator.get_state()
    loss({"data": v}, index)
    loss.generator.set_state(gen_state)
    scores = loss.scores(v, index)  # same draws as the first call
    assert loss.z.item() == pytest.approx(torch.exp(scores).mean().item() * 10, rel=1e-5)
    z = loss.z.item()
    loss({"data": torch.randn(3, 2)}, index)
    assert loss.z.item() == z  # fixed afterwards


def test_fixed_norm_constant_is_kept():
    loss = make_loss(norm_constant=7.0)
    loss.eval()
    loss({"data": torch.randn(2, 2)}, torch.tensor([0, 1]))
    assert loss.z.item() == 7.0


def test_memory_update_direction_and_normalisation():
    bank = MemoryBank(4, 2, momentum=0.9)
    bank.memory.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
    v = torch.tensor([[0.0, 1.0]])
    bank.update(v, torch.tensor([0]))
    expected = F.normalize(torch.tensor([0.9, 0.1]), dim=0)  # momentum weights the OLD row
    assert torch.allclose(bank.memory[0], expected)
    assert bank.memory[0].norm().item() == pytest.approx(1.0)
    assert torch.equal(bank.memory[1:], torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("policy,expected", [("last", [0.0, 1.0]), ("mean", [1.0, 1.0])])
def test_duplicate_indices_in_one_update(policy, expected):
    bank = MemoryBank(3, 2, momentum=0.0, duplicate_update=policy)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    bank.update(v, torch.tensor([1, 1, 2]))
    assert torch.allclose(bank.memory[1], F.normalize(torch.tensor(expected), dim=0))
    assert torch.allclose(bank.memory[2], torch.tensor([0.0, 1.0]))


def test_bank_init_is_uniform_then_unit_norm():
    bank = MemoryBank(1000, 128, norm_init=False, seed=3)
    bound = 1 / math.sqrt(128 / 3)
    assert bank.memory.abs().max().item() <= bound
    normed = MemoryBank(1000, 128, seed=3)
    assert torch.allclose(normed.memory.norm(dim=1), torch.ones(1000), atol=1e-5)
    assert torch.equal(MemoryBank(1000, 128, seed=3).memory, normed.memory)  # same seed, same bank


def test_negatives_shape_range_and_positive_column():
    loss = make_loss(n=50, k=200)
    index = torch.tensor([3, 7, 49])
    idx = loss.sample_negatives(index, 200)
    assert idx.shape == (3, 201)
    assert torch.equal(idx[:, 0], index)
    assert idx.min() >= 0 and idx.max() < 50
    # per sample, i.i.d.: rows differ
    assert not torch.equal(idx[0, 1:], idx[1, 1:])


def test_exclude_positive_never_draws_it():
    loss = make_loss(n=5, k=4, exclude=True)
    index = torch.arange(5)
    idx = loss.sample_negatives(index, 4000)
    assert (idx[:, 1:] != index[:, None]).all()
    assert set(idx[0, 1:].tolist()) == {1, 2, 3, 4}


def test_shared_negatives_one_set_per_step():
    loss = make_loss(n=20, k=6, type="shared", temperature=1.0)
    v = F.normalize(torch.randn(3, 2), dim=1)
    index = torch.tensor([0, 5, 9])
    state = loss.generator.get_state()
    s = loss.scores(v, index)
    loss.generator.set_state(state)
    neg = torch.randint(0, 20, (6,), generator=loss.generator)
    assert s.shape == (3, 7)
    assert torch.allclose(s[:, 0], (loss.memory.memory[index] * v).sum(1))
    assert torch.allclose(s[:, 1:], v @ loss.memory.memory[neg].t())


def test_pirl_updates_bank_with_image_output_only_after_scoring_both():
    loss = make_loss(
        n=6,
        k=3,
        on_forward=False,
        update_mem_with_emb_index=1,
        loss_weights=[0.5, 0.5],
        momentum=0.0,
    )
    loss.train()
    before = loss.memory.memory.clone()
    patches = F.normalize(torch.tensor([[1.0, 0.0]]), dim=1)
    images = F.normalize(torch.tensor([[0.0, 1.0]]), dim=1)
    loss({"patches": patches, "images": images}, torch.tensor([2]))
    assert torch.allclose(loss.memory.memory[2], images[0])  # momentum 0: the row becomes the image
    assert torch.equal(loss.memory.memory[[0, 1, 3, 4, 5]], before[[0, 1, 3, 4, 5]])


def test_npid_updates_on_forward_and_eval_mode_does_not():
    loss = make_loss(n=6, k=3, momentum=0.0)
    v = torch.tensor([[0.0, 2.0]])
    loss.eval()
    before = loss.memory.memory.clone()
    loss({"data": v}, torch.tensor([4]))
    assert torch.equal(loss.memory.memory, before)
    loss.train()
    loss({"data": v}, torch.tensor([4]))
    assert torch.allclose(loss.memory.memory[4], torch.tensor([0.0, 1.0]))


def test_gradient_reaches_embeddings_not_bank():
    loss = make_loss(n=8, k=4)
    v = torch.randn(2, 2, requires_grad=True)
    loss({"data": v}, torch.tensor([0, 1])).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert not loss.memory.memory.requires_grad


def test_half_precision_bank_storage():
    bank = MemoryBank(10, 4, dtype="float16")
    assert bank.memory.dtype == torch.float16
    bank.update(torch.randn(2, 4), torch.tensor([1, 2]))
    assert bank.rows(torch.tensor([1])).dtype == torch.float32


def materialised_scores(bank: MemoryBank, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.bmm(bank.rows(idx), v.unsqueeze(2)).squeeze(2)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_chunked_scores_equal_the_materialised_rows_even_after_bank_updates(monkeypatch, dtype):
    import pirl.memory

    monkeypatch.setattr(pirl.memory, "CHUNK_ROWS", 64)  # several chunks of a 4 x 301 draw
    torch.manual_seed(0)
    bank = MemoryBank(500, 16, momentum=0.5, dtype=dtype)
    idx = torch.randint(0, 500, (4, 301))
    idx[:, 0] = torch.tensor([1, 2, 3, 4])
    idx[0, 5], idx[1, 7], idx[2, 9] = 2, 3, 1  # negatives that this step's updates overwrite
    v = F.normalize(torch.randn(4, 16), dim=1).requires_grad_()
    w = torch.randn(4, 301)
    bank.begin_step()
    expected = materialised_scores(bank, v, idx)
    (expected_grad,) = torch.autograd.grad((expected * w).sum(), v)
    scores = bank.scores(v, idx)
    assert torch.allclose(scores, expected, atol=1e-6)
    # Two updates inside the step (as NPID/PIRL make before backward), one touching a row twice.
    bank.update(torch.randn(4, 16), torch.tensor([1, 2, 3, 4]))
    bank.update(torch.randn(2, 16), torch.tensor([2, 7]))
    assert not torch.allclose(materialised_scores(bank, v, idx), expected, atol=1e-3)
    (grad,) = torch.autograd.grad((scores * w).sum(), v)
    assert torch.allclose(grad, expected_grad, atol=1e-5)


def test_backward_after_the_next_step_began_is_refused():
    bank = MemoryBank(50, 4)
    v = torch.randn(2, 4, requires_grad=True)
    bank.begin_step()
    scores = bank.scores(v, torch.randint(0, 50, (2, 6)))
    bank.update(torch.randn(2, 4), torch.tensor([0, 1]))
    bank.begin_step()
    with pytest.raises(RuntimeError, match="before the loss's next forward"):
        scores.sum().backward()


def test_updates_without_scores_keep_no_rows():
    bank = MemoryBank(50, 4)
    for _ in range(100):
        bank.update(torch.randn(2, 4), torch.tensor([0, 1]))
    assert bank._undo == []


def test_bank_average_start_on_two_ranks_is_vissls(tmp_path):
    """init_sync=average averages each rank's own random bank, as VISSL's per-rank seeds make
    it: rows of norm ~1/sqrt(2) at W=2 and a smaller first-batch Z than broadcast's unit rows."""
    import json
    import subprocess
    import sys

    from .conftest import REPO, free_port, subprocess_env

    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
        + [f"--master-port={free_port()}", "-m", "tests.bench.bank_init"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {r["init_sync"]: r for r in map(json.loads, out.stdout.strip().splitlines())}
    broadcast, average = rows["broadcast"], rows["average"]
    assert broadcast["mean_row_norm"] == pytest.approx(1.0, abs=1e-5)
    assert average["mean_row_norm"] == pytest.approx(2**-0.5, abs=0.02)
    assert 0.6 < average["z"] / broadcast["z"] < 0.75
