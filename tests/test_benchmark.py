"""`pirl benchmark`: kNN, the frozen-trunk protocol, config and CLI, end to end on the digits."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pirl import dist
from pirl.benchmark import main
from pirl.benchmark.config import check, head_names, load
from pirl.benchmark.features import FeatureExtractor, frozen_violations, run_batches
from pirl.benchmark.heads import build_heads
from pirl.benchmark.knn import knn_evaluate, knn_votes, topk_correct
from pirl.benchmark.linear import CachedTrainFeatures, ProtocolError, check_protocol, train_heads
from pirl.benchmark.report import flat_summary, read_pretraining, text_table
from pirl.benchmark.run import Context
from pirl.errors import ConfigError
from pirl.models import ResNetTrunk
from pirl.schema import Optimizer
from pirl.weights import export_torchvision, state_digest

from .conftest import free_port, subprocess_env

DEMO = "config=benchmark/linear_image_classification/demo/eval_resnet18_demo_linear"
IN1K = (
    "config=benchmark/linear_image_classification/imagenet1k/eval_resnet_8gpu_transfer_in1k_linear"
)


# ----------------------------------------------------------------------------------------------
# kNN


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_knn_known_answer_and_temperature_weighting():
    # Class 0 around +x, class 1 around +y; the queries sit next to one cluster each.
    bank = unit([1, 0.1], [1, -0.1], [0.9, 0], [0.1, 1], [-0.1, 1], [0, 0.9])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    queries = unit([1, 0.05], [0.05, 1])
    votes = knn_votes(bank, labels, queries, [3], temperature=0.07, num_classes=2)[3]
    assert votes.argmax(1).tolist() == [0, 1]

    # One very close neighbour of class 0 outvotes two far ones of class 1 (a majority vote
    # would say 1): the weights are exp(cos / T).
    bank = unit([1, 0], [0, 1], [0.05, 1])
    labels = torch.tensor([0, 1, 1])
    query = unit([1, 0.01])
    v = knn_votes(bank, labels, query, [3], temperature=0.07, num_classes=2)[3]
    assert v.argmax(1).item() == 0
    cos = (query @ bank.T)[0]
    expected = torch.tensor(
        [math.exp(cos[0] / 0.07), math.exp(cos[1] / 0.07) + math.exp(cos[2] / 0.07)]
    )
    torch.testing.assert_close(v[0], expected)
    # k=1 takes only the nearest; a huge T makes the vote a plain count (class 1 wins 2-1).
    assert knn_votes(bank, labels, query, [1], 0.07, 2)[1].argmax(1).item() == 0
    assert knn_votes(bank, labels, query, [3], 1e4, 2)[3].argmax(1).item() == 1
    # k beyond the bank is clamped to the bank.
    assert torch.equal(knn_votes(bank, labels, query, [200], 0.07, 2)[200], v)


def test_knn_evaluate_percentages_and_topk():
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(4, 16), dim=1)
    train = centers.repeat_interleave(5, 0) + 0.05 * torch.randn(20, 16)
    train_labels = torch.arange(4).repeat_interleave(5)
    test = centers + 0.05 * torch.randn(4, 16)
    test_labels = torch.tensor([0, 1, 2, 0])  # the last one is deliberately wrong
    result = knn_evaluate(train, train_labels, test, test_labels, [1, 5], 0.07, 4)
    assert result["1"]["top1"] == pytest.approx(75.0)
    assert result["5"]["top5"] == pytest.approx(100.0)  # 4 classes: top-5 is every class
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert topk_correct(scores, torch.tensor([1, 2]), (1, 2)) == [1, 1]


# ----------------------------------------------------------------------------------------------
# The frozen-trunk protocol on a tiny model


class FakeData:
    """The pirl.data contract, on random 32-px images with learnable labels."""

    def __init__(self, n: int = 48, batch: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.arange(n) % 3
        self.x += self.y[:, None, None, None].float()  # separable by brightness
        self.batch, self.num_samples, self.classes = batch, n, ["a", "b", "c"]

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.batch)

    def batches(self, epoch: int):
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, self.num_samples, self.batch):
            idx = order[i : i + self.batch]
            yield {"data": self.x[idx], "label": self.y[idx], "index": idx}

    def eval_batches(self):
        for i in range(0, self.num_samples, self.batch):
            yield {"data": self.x[i : i + self.batch], "label": self.y[i : i + self.batch]}


OPS = [
    ["res4", ["AdaptiveAvgPool2d", [1]]],
    ["res5avg", ["Identity", []]],
    ["res5avg", ["Identity", []]],
]
HEADS = [["eval_mlp", {"in_channels": 1, "dims": [1, 3]}]] * 2 + [["mlp", {"dims": [1, 3]}]]


def tiny_setup():
    torch.manual_seed(0)
    trunk = ResNetTrunk(18)
    extractor = FeatureExtractor(trunk, OPS, "res5avg")
    data = FakeData()
    pooled, knn = extractor(next(data.batches(0))["data"])
    heads, notes = build_heads(HEADS, [p.shape[1:] for p in pooled], 3, seed=0)
    return trunk, extractor, data, heads, notes, knn


def test_use_amp_autocasts_the_frozen_trunk_on_cpu_as_training_does():
    """MODEL.AMP_PARAMS.USE_AMP means one thing everywhere (pirl.precision): bf16 on CPU too."""
    trunk, extractor, data, *_ = tiny_setup()
    cfg, _ = load([DEMO, "config.MODEL.AMP_PARAMS.USE_AMP=true"], world_size=1)
    env = dist.DistEnv(
        rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo"
    )
    ctx = Context(cfg, None, env, data, None, None, 3, [])  # type: ignore[arg-type]
    seen = []
    trunk.conv1.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    pooled, _, _ = next(run_batches(extractor, data.eval_batches(), env.device, ctx.amp))
    assert ctx.amp == torch.bfloat16 and seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in pooled)  # the heads' inputs stay float32


def test_heads_are_initialised_as_vissls_benchmark_heads():
    """PyTorch's default Linear init (VISSL's MLP keeps it), scaled by HEAD.PARAMS_MULTIPLIER,
    each head under the same seed SEED_VALUE: two heads of one shape start identical."""
    params = [["eval_mlp", {"in_channels": 64, "dims": [256, 10]}]] * 2
    params += [["mlp", {"dims": [256, 10]}]]
    shapes = [torch.Size([64, 2, 2])] * 2 + [torch.Size([256])]
    heads, _ = build_heads(params, shapes, 10, seed=1)
    torch.manual_seed(1)
    reference = torch.nn.Linear(256, 10)
    for head in heads.heads:
        assert torch.equal(head.clf.weight, reference.weight)
        assert torch.equal(head.clf.bias, reference.bias)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) and the bias both give 1/sqrt(fan_in)
    assert heads.heads[0].clf.weight.abs().max() <= bound
    assert heads.heads[0].clf.weight.std() > 0.5 * bound / math.sqrt(3)  # not N(0, 0.01)
    scaled, _ = build_heads(params, shapes, 10, seed=1, params_multiplier=0.5)
    assert torch.equal(scaled.heads[2].clf.weight, 0.5 * reference.weight)


def test_protocol_only_heads_train_and_the_trunk_is_untouched():
    trunk, extractor, data, heads, notes, knn = tiny_setup()
    assert knn.shape == (16, 512)
    assert any("(follows the pooled feature" in n for n in notes)  # dims derived from features
    trunk_before = state_digest(trunk.state_dict())
    heads_before = state_digest(heads.state_dict())
    bn_var = trunk.layer2[0].bn1.running_var.clone()

    def batches(epoch):
        for b in data.batches(epoch):
            pooled, _ = extractor(b["data"])
            yield pooled, b["label"]

    extractor.train()  # must not switch the trunk to train mode
    lr = {"name": "constant", "value": 0.05, "update_interval": "epoch"}
    history = train_heads(
        heads,
        trunk,
        batches,
        data.steps_per_epoch,
        Optimizer(num_epochs=3, nesterov=True),
        lr,
        ["a", "b", "c"],
    )
    assert len(history) == 3 and set(history[0]["loss"]) == {"a", "b", "c"}
    assert history[-1]["loss"]["a"] < history[0]["loss"]["a"]
    assert state_digest(trunk.state_dict()) == trunk_before  # bit-identical, BN stats included
    assert torch.equal(trunk.layer2[0].bn1.running_var, bn_var)
    assert not any(m.training for m in trunk.modules())
    assert all(not p.requires_grad for p in trunk.parameters())
    assert state_digest(heads.state_dict()) != heads_before
    assert all(p.grad is None for p in trunk.parameters())


def test_heads_are_tested_every_n_epochs_and_after_the_last():
    trunk, extractor, data, heads, _, _ = tiny_setup()

    def batches(epoch):
        for b in data.batches(epoch):
            yield extractor(b["data"])[0], b["label"]

    tested = []

    def test(epoch):
        tested.append((epoch, heads.training))
        return {"a": {"top1": 10.0 * epoch, "top5": 50.0}}

    lr = {"name": "constant", "value": 0.05, "update_interval": "epoch"}
    history = train_heads(
        heads,
        trunk,
        batches,
        data.steps_per_epoch,
        Optimizer(num_epochs=5),
        lr,
        ["a", "b", "c"],
        test=test,
        test_every=2,
    )
    assert [e for e, _ in tested] == [1, 3, 4]  # epochs 2 and 4 (1-based), and the last
    assert [r["epoch"] for r in history if "test" in r] == [1, 3, 4]
    assert history[3]["test"]["a"]["top1"] == 30.0


def test_best_tested_epoch_is_reported_beside_the_last():
    from pirl.benchmark.run import best_test

    history = [
        {"epoch": 0, "test": {"h": {"top1": 40.0, "top5": 80.0}}},
        {"epoch": 1},
        {"epoch": 2, "test": {"h": {"top1": 55.0, "top5": 81.0}}},
        {"epoch": 3, "test": {"h": {"top1": 55.0, "top5": 90.0}}},
        {"epoch": 4, "test": {"h": {"top1": 50.0, "top5": 95.0}}},
    ]
    assert best_test(history, "h") == {"best_top1": 55.0, "best_top5": 90.0, "best_epoch": 3}


def test_protocol_violations_are_caught():
    trunk, _, _, heads, _, _ = tiny_setup()
    good = torch.optim.SGD(heads.parameters(), lr=0.1)
    check_protocol(trunk, heads, good)
    trunk.layer3.train()
    assert any("layer3" in v for v in frozen_violations(trunk))
    with pytest.raises(ProtocolError, match="train mode"):
        check_protocol(trunk, heads, good)
    trunk.eval()
    trunk.fc_like = torch.nn.Linear(2, 2).eval()  # a trainable parameter inside the trunk
    with pytest.raises(ProtocolError, match="requires grad"):
        check_protocol(trunk, heads, good)
    del trunk.fc_like
    both = torch.optim.SGD([*heads.parameters(), next(trunk.parameters())], lr=0.1)
    with pytest.raises(ProtocolError, match="trunk parameter"):
        check_protocol(trunk, heads, both)


def test_cached_features_give_every_rank_the_same_steps_and_cover_the_data():
    n, world, batch = 10, 3, 2
    per_rank = math.ceil(n / world)
    seen = []
    steps = set()
    for rank in range(world):
        idx = torch.arange(rank, n, world)  # eval_batches' split: rank counts differ by one
        cached = CachedTrainFeatures(
            [idx.float()[:, None]], idx, batch, per_rank, seed=0, rank=rank
        )
        got = list(cached.batches(epoch=1))
        steps.add(len(got))
        labels = torch.cat([y for _, y in got])
        assert len(labels) == per_rank and set(labels.tolist()) == set(idx.tolist())
        seen += labels.tolist()
    assert steps == {cached.steps_per_epoch} and set(seen) == set(range(n))


# ----------------------------------------------------------------------------------------------
# Config and command line


def test_presets_compose_with_the_protocol(capsys):
    cfg, derived = load([IN1K])
    assert cfg.OPTIMIZER.num_epochs == 28 and cfg.OPTIMIZER.nesterov
    assert cfg.OPTIMIZER.weight_decay == 5e-4
    assert derived.global_batch_size == 256 and derived.lr["values"][0] == pytest.approx(0.01)
    assert derived.lr["milestones"] == [8, 16, 24]
    assert derived.heads == ["conv1", "res2", "res3", "res4", "res5", "res5avg", "res5avg_nobn"]
    assert cfg.DATA.TRAIN.SPLIT == "train" and cfg.DATA.TEST.SPLIT == "val"
    assert cfg.KNN.K == [20, 200] and cfg.KNN.TEMPERATURE == 0.07
    cfg, derived = load([DEMO, "config.DATA.TRAIN.DATA_PATHS=[memory://digits]"])
    assert cfg.MODEL.TRUNK.RESNETS.DEPTH == 18 and "res5" in derived.heads
    assert cfg.DATA.TEST.DATA_PATHS == ["memory://digits"]  # the val split of the same shards

    assert main([DEMO, "--dry-run", "config.KNN.K=[5]"]) == 0
    out = capsys.readouterr().out
    assert "LINEAR_EVAL_FEAT_POOL_OPS_MAP" in out and "K: [5]" in out and "derived:" in out


def test_bad_overrides_fail_with_a_message(capsys):
    assert main([DEMO, "config.KNN.TEMPERATUR=0.1"]) == 2
    assert "did you mean 'config.KNN.TEMPERATURE'" in capsys.readouterr().err
    assert main([DEMO, "config.KNN.TEMPERATURE=0"]) == 2
    assert "config.KNN.TEMPERATURE must be > 0" in capsys.readouterr().err
    assert main(["config=pretrain/pirl/pirl_demo_resnet18"]) == 2
    assert "not a benchmark preset" in capsys.readouterr().err
    assert main([DEMO, "config.DATA.TRAIN.LABEL_TYPE=sample_index"]) == 2
    assert "LABEL_TYPE" in capsys.readouterr().err
    assert main([DEMO, "--dry-run", "--world-size", "2"]) == 2
    assert "NUM_PROC_PER_NODE" in capsys.readouterr().err


def test_heads_and_features_must_pair_up():
    cfg, _ = load([DEMO])
    cfg.MODEL.HEAD.PARAMS = cfg.MODEL.HEAD.PARAMS[:2]
    with pytest.raises(ConfigError, match="one feature per head"):
        check(cfg)
    cfg, _ = load([DEMO])
    cfg.MODEL.FEATURE_EVAL_SETTINGS.LINEAR_EVAL_FEAT_POOL_OPS_MAP[0] = ["res9", ["Identity", []]]
    with pytest.raises(ConfigError, match="res9"):
        check(cfg)
    cfg, _ = load([DEMO])
    assert head_names(cfg) == ["res3", "res4", "res5", "res5avg", "res5avg_nobn"]


# ----------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def small_digits(digits_folder, tmp_path_factory):
    """12 train and 5 val images per class of the digits: every class in a small set."""
    root = tmp_path_factory.mktemp("small_digits")
    for split, n in (("train", 12), ("val", 5)):
        for class_dir in sorted((digits_folder / split).iterdir()):
            dest = root / split / class_dir.name
            dest.mkdir(parents=True)
            for f in sorted(class_dir.iterdir())[:n]:
                shutil.copy(f, dest / f.name)
    return root


def digits_args(digits_folder, tmp_path, *extra: str) -> list[str]:
    weights = tmp_path / "trunk.safetensors"
    torch.manual_seed(1)
    export_torchvision(ResNetTrunk(18).state_dict(), str(weights))
    metrics = tmp_path / "metrics.jsonl"
    records = [
        {"epoch": 0, "step": s, "global_step": s, "loss": 8.0 - 0.1 * s} for s in range(1, 30)
    ]
    health = {"loss_vs_chance": 0.6, "bank_mean_cosine": 0.05, "positive_cosine": 0.7}
    health |= {"alignment": 0.6, "uniformity": -3.5}
    records.append({"epoch": 0, "global_step": 29, "epoch_loss": 6.0, "health": health})
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    return [
        DEMO,
        "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
        "config.DATA.TEST.DATA_SOURCES=[disk_folder]",
        f"config.DATA.TRAIN.DATA_PATHS=[{digits_folder / 'train'}]",
        f"config.DATA.TEST.DATA_PATHS=[{digits_folder / 'val'}]",
        f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={weights}",
        f"config.PRETRAIN_METRICS={metrics}",
        f"config.OUTPUT_DIR={tmp_path / 'out'}",
        "config.MACHINE.DEVICE=cpu",
        *extra,
    ]


def check_outputs(out, baseline: bool = True) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    names = [h["name"] for h in metrics["protocol"]["heads"]]
    trained = metrics["trunks"]["trained"]
    assert set(trained["linear"]) == set(names)
    for r in trained["linear"].values():
        assert 0 <= r["top1"] <= r["top5"] <= 100
    assert set(trained["knn"]) == {"20", "200"}
    assert trained["trunk_unchanged"] and len(trained["weights"]["sha256"]) == 64
    assert metrics["headline"]["linear_head"] == trained["best_head"]
    assert ("random_init" in metrics["trunks"]) == baseline
    assert metrics["dataset"]["num_classes"] == 10
    md = (out / "report.md").read_text()
    assert "![benchmark](report.png)" in md and "kNN k=200" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "linear res5" in html
    return metrics


def test_end_to_end_small(small_digits, tmp_path, capsys):
    args = digits_args(
        small_digits, tmp_path, "config.OPTIMIZER.num_epochs=2", "config.BASELINE_RANDOM=true"
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "random-init" in out and "kNN k=20" in out and "linear res5avg_nobn" in out
    metrics = check_outputs(tmp_path / "out")
    assert metrics["dataset"]["train"]["num_samples"] == 120
    assert metrics["dataset"]["val"]["num_samples"] == 50
    pretraining = read_pretraining(str(tmp_path / "metrics.jsonl"))
    assert pretraining.curve[:2] == [(1, 7.9), (2, 7.8)]  # the epoch record has no "loss"
    assert metrics["pretraining_health"] == {"epoch": 0, **pretraining.epochs[0]["health"]}
    assert "bank mean cosine 0.050" in (tmp_path / "out" / "report.md").read_text()
    assert "trained.linear.res5.top1" in flat_summary(metrics)
    assert "headline: linear" in text_table(metrics)
    for trunk in metrics["trunks"].values():  # tested after each epoch (TEST_EVERY_NUM_EPOCH=1)
        history = trunk["linear_train"]
        assert all("test" in r for r in history)
        for name, r in trunk["linear"].items():
            assert r["top1"] == history[-1]["test"][name]["top1"]
            assert r["best_top1"] == max(h["test"][name]["top1"] for h in history)


def test_end_to_end_missing_weights_fails_cleanly(small_digits, tmp_path, capsys):
    args = digits_args(small_digits, tmp_path)
    args = [a for a in args if "PARAMS_FILE" not in a]
    args.append(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={tmp_path / 'nope.pt'}")
    assert main(args) == 2
    assert "do not exist" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("layout", ["model_state_dict", "classy_state_dict"])
def test_end_to_end_on_vissl_model_zoo_layouts(small_digits, tmp_path, capsys, layout):
    """VISSL's two zoo layouts run as they are, with no conversion step."""
    torch.manual_seed(2)
    trunk = {f"_feature_blocks.{k}": v for k, v in ResNetTrunk(18).state_dict().items()}
    if layout == "model_state_dict":  # the converted NPID R50's layout
        ckpt = {"model_state_dict": trunk}
    else:
        ckpt = {"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": {}}}}}
    path = tmp_path / "model_final_checkpoint_phase199.torch"
    torch.save(ckpt, path)
    args = digits_args(small_digits, tmp_path, "config.OPTIMIZER.num_epochs=1")
    args = [a for a in args if "PARAMS_FILE" not in a]
    args.append(f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={path}")
    assert main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    weights = metrics["trunks"]["trained"]["weights"]
    assert weights["format"] == ("vissl_converted" if layout == "model_state_dict" else "vissl")
    expected = {k.removeprefix("_feature_blocks."): v for k, v in trunk.items()}
    assert weights["state_sha256"] == state_digest(expected)


def test_low_shot_subset_is_a_seeded_per_class_fraction():
    from pirl.benchmark.lowshot import per_class_subset

    labels = [i % 4 for i in range(400)] + [4, 4, 4]  # 100 of each class 0..3, 3 of class 4
    chosen = per_class_subset(labels, 0.1, seed=0)
    counts = [sum(labels[i] == c for i in chosen) for c in range(5)]
    assert counts == [10, 10, 10, 10, 1]  # at least one image of every class
    assert chosen == sorted(chosen) == per_class_subset(labels, 0.1, seed=0)
    assert chosen != per_class_subset(labels, 0.1, seed=1)
    # a class's draw depends only on (seed, class): other classes do not move it
    fewer = per_class_subset(labels[:400], 0.1, seed=0)
    assert [i for i in chosen if labels[i] == 2] == [i for i in fewer if labels[i] == 2]


def test_low_shot_end_to_end(small_digits, tmp_path):
    args = digits_args(
        small_digits,
        tmp_path,
        "config.OPTIMIZER.num_epochs=1",
        "config.LOW_SHOT.FRACTION=0.25",
        "config.LOW_SHOT.SEED=3",
    )
    assert main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    train = metrics["dataset"]["train"]
    assert train["num_samples"] == 30  # 3 of each class's 12
    assert train["low_shot"] == {"fraction": 0.25, "seed": 3}
    assert metrics["dataset"]["val"]["num_samples"] == 50  # validation stays whole


def test_low_shot_values_are_checked():
    cfg, _ = load(
        [DEMO, "config.LOW_SHOT.FRACTION=0.1", "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]"]
    )
    cfg.LOW_SHOT.FRACTION = 0
    with pytest.raises(ConfigError, match=r"LOW_SHOT.FRACTION must be in \(0, 1\]"):
        check(cfg)
    cfg.LOW_SHOT.FRACTION = 0.1
    cfg.DATA.TRAIN.DATA_SOURCES = ["shards"]
    with pytest.raises(ConfigError, match="pirl prep"):
        check(cfg)


# VISSL's protocol path (docs/vissl-notes.md#linear-evaluation-protocol): the trunk runs on freshly augmented crops every epoch, and the kNN bank
# is a separate pass over the train split with the TEST transforms.
STREAMING = [
    "config.MODEL.FEATURE_EVAL_SETTINGS.CACHE_TRAIN_FEATURES=false",
    "config.DATA.TRAIN.TRANSFORMS=[{name: RandomResizedCrop, size: 32, scale: [0.5, 1.0]},"
    "{name: ToTensor}, {name: Normalize, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}]",
]


def test_end_to_end_streaming_protocol(small_digits, tmp_path, capsys):
    args = digits_args(
        small_digits,
        tmp_path,
        "config.OPTIMIZER.num_epochs=2",
        "config.LOG_FREQUENCY=1",
        "config.BASELINE_RANDOM=false",
        *STREAMING,
    )
    assert main(args) == 0
    metrics = check_outputs(tmp_path / "out", baseline=False)
    assert not metrics["protocol"]["cache_train_features"]
    assert metrics["dataset"]["train"]["transforms"][0]["name"] == "RandomResizedCrop"
    history = metrics["trunks"]["trained"]["linear_train"]
    assert [r["epoch"] for r in history if "test" in r] == [0, 1]


def test_end_to_end_writes_tensorboard_events(small_digits, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = digits_args(
        small_digits,
        tmp_path,
        "config.OPTIMIZER.num_epochs=3",
        "config.TEST_EVERY_NUM_EPOCH=2",
        "config.HOOKS.TENSORBOARD_SETUP.USE_TENSORBOARD=true",
    )
    assert main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    trained = metrics["trunks"]["trained"]
    acc = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    acc.Reload()
    top1 = {e.step: e.value for e in acc.Scalars("trained/Linear/res5/top1")}
    assert sorted(top1) == [1, 2]  # epoch 2 (1-based) and the last
    assert top1[2] == pytest.approx(trained["linear"]["res5"]["top1"])
    assert len(acc.Scalars("trained/Linear/res5/train_loss")) == 3
    knn = acc.Scalars("trained/kNN/k20/top1")
    assert [(e.step, round(e.value, 4)) for e in knn] == [
        (2, round(trained["knn"]["20"]["top1"], 4))
    ]


@pytest.mark.slow
def test_end_to_end_demo_preset_on_the_digits(digits_folder, tmp_path, capsys):
    """The demo preset as `make demo` runs it (all 1,498/299 images, trained vs random-init)."""
    assert main(digits_args(digits_folder, tmp_path)) == 0
    metrics = check_outputs(tmp_path / "out", baseline=True)
    # Even a random ResNet's features separate the digits well above chance (10%).
    assert metrics["headline"]["linear_top1"] > 50
    assert metrics["headline"]["knn_top1"]["20"] > 50


@pytest.mark.slow
def test_two_ranks_under_torchrun_match_one_rank(small_digits, tmp_path):
    """gloo, 2 processes: same data sizes, and the same kNN numbers as one process (the bank is
    gathered from both ranks; eval-mode features do not depend on how samples are split)."""
    limits = ["config.DATA.TRAIN.DATA_LIMIT=101", "config.DATA.TEST.DATA_LIMIT=47"]  # odd sizes
    common = [
        *limits,
        "config.OPTIMIZER.num_epochs=2",
        "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16",
        "config.BASELINE_RANDOM=false",
        *STREAMING,
    ]
    one = digits_args(small_digits, tmp_path / "one", *common)
    (tmp_path / "one").mkdir(exist_ok=True)
    assert main(one) == 0
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    two = digits_args(small_digits, two_dir, *common, "config.DISTRIBUTED.NUM_PROC_PER_NODE=2")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
        "-m",
        "pirl.benchmark",
        *two,
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "out" / "metrics.json").read_text())
    m2 = check_outputs(two_dir / "out", baseline=False)
    assert m2["runtime"]["world_size"] == 2 and m2["protocol"]["global_batch_size"] == 32
    assert (
        m2["dataset"]["train"]["num_samples"] == 101 and m2["dataset"]["val"]["num_samples"] == 47
    )
    for k in ("20", "200"):
        assert m2["trunks"]["trained"]["knn"][k]["top1"] == pytest.approx(
            m1["trunks"]["trained"]["knn"][k]["top1"]
        )


@pytest.mark.slow
def test_weights_metrics_and_outputs_on_s3(small_digits, tmp_path, s3_bucket, capsys):
    """Every URL of the run on an object store (a local S3 server): weights, metrics.jsonl, outputs."""
    from pirl import storage

    args = digits_args(
        small_digits,
        tmp_path,
        "config.OPTIMIZER.num_epochs=1",
        "config.BASELINE_RANDOM=false",
        "config.DATA.TRAIN.DATA_LIMIT=40",
        "config.DATA.TEST.DATA_LIMIT=20",
    )
    for name in ("trunk.safetensors", "metrics.jsonl"):
        storage.write_bytes(f"{s3_bucket}/run/{name}", (tmp_path / name).read_bytes())
    args = [a for a in args if "PARAMS_FILE" not in a and "PRETRAIN_METRICS" not in a]
    args = [a for a in args if "OUTPUT_DIR" not in a]
    args += [
        f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={s3_bucket}/run",  # the run directory
        f"config.PRETRAIN_METRICS={s3_bucket}/run/metrics.jsonl",
        f"config.OUTPUT_DIR={s3_bucket}/bench",
    ]
    assert main(args) == 0
    assert storage.list_names(f"{s3_bucket}/bench") == [
        "metrics.json",
        "report.html",
        "report.md",
        "report.png",
    ]
    metrics = json.loads(storage.read_bytes(f"{s3_bucket}/bench/metrics.json"))
    weights = metrics["trunks"]["trained"]["weights"]
    assert weights["resolved_url"] == f"{s3_bucket}/run/trunk.safetensors"
