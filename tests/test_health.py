"""Representation-health statistics: exact values on constructed inputs, and the collapse warning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pirl import config
from pirl.health import (
    HealthMeter,
    chance_loss,
    collapse_warning,
    mean_pairwise_cosine,
    uniformity,
)
from pirl.loss import NCELossWithMemory, nce_loss


def test_infonce_chance_is_the_loss_of_equal_scores():
    k = 64
    scores = torch.zeros(5, k + 1)
    ce = F.cross_entropy(scores, torch.zeros(5, dtype=torch.long)).item()
    assert chance_loss("cross_entropy", k) == pytest.approx(ce) == pytest.approx(math.log(k + 1))


def test_nce_chance_is_the_loss_when_every_x_is_one_over_n():
    k, n = 64, 1000
    z = torch.tensor(float(n))  # exp(0) / Z = 1/N for every score
    expected = nce_loss(torch.zeros(3, k + 1), z, n).item()
    assert chance_loss("nce", k) == pytest.approx(expected, rel=1e-4)  # float32 eps terms


def test_mean_pairwise_cosine_is_exact():
    rows = F.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    brute = (rows @ rows.t()).sum() - 50
    assert mean_pairwise_cosine(rows) == pytest.approx((brute / (50 * 49)).item(), abs=1e-5)
    assert mean_pairwise_cosine(torch.ones(10, 4)) == pytest.approx(1.0)  # collapsed


def test_uniformity_spans_collapsed_to_spread():
    same = F.normalize(torch.ones(8, 4), dim=1)
    assert uniformity(same) == pytest.approx(0.0)
    spread = F.normalize(torch.randn(2000, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    assert uniformity(spread[:500]) == pytest.approx(-4.0, abs=0.1)  # ||d||^2 ~ 2


def test_meter_reports_alignment_with_the_bank_rows():
    meter = HealthMeter()
    v = F.normalize(torch.randn(8, 16), dim=1)
    meter.add(v, v.clone())  # embeddings equal to their rows
    meter.add(v, -v)  # opposite
    summary = meter.summary(torch.eye(16), epoch_loss=1.0, chance=2.0)
    assert summary["positive_cosine"] == pytest.approx(0.0, abs=1e-6)
    assert summary["alignment"] == pytest.approx(2.0, abs=1e-6)
    assert summary["loss_vs_chance"] == pytest.approx(0.5)
    assert summary["bank_mean_cosine"] == pytest.approx(0.0, abs=1e-6)


def test_collapse_warning_names_the_signs_and_spares_the_first_epochs():
    collapsed = {"loss_vs_chance": 0.99, "bank_mean_cosine": 0.93}
    assert collapse_warning(collapsed, epoch=1) is None
    text = collapse_warning(collapsed, epoch=2)
    assert "0.99x its chance value" in text and "mean cosine is 0.93" in text
    assert collapse_warning({"loss_vs_chance": 0.5, "bank_mean_cosine": 0.1}, epoch=5) is None


def test_pirl_loss_chance_weights_its_terms():
    cfg, _ = config.load(["config=pretrain/pirl/pirl_demo_resnet18"], world_size=1)
    loss = NCELossWithMemory(cfg.LOSS.nce_loss_with_memory, 2000)
    params = cfg.LOSS.nce_loss_with_memory
    per_term = chance_loss(params.loss_type, params.negative_sampling_params.num_negatives)
    assert loss.chance() == pytest.approx(per_term * sum(params.loss_weights))
