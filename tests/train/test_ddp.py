"""DDP: distributed samplers, gathered (never padded or averaged) tables, and sweeps of DDP jobs, on CPU with gloo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import spawn
from torch.utils.data import DistributedSampler

import train as train_script
from animl_lightning.train.classifier import RNG_STATES_KEY, RNG_STATES_PER_RANK_KEY, rng_states_to_restore
from animl_lightning.train.datamodule import CropDataModule
from animl_lightning.train.run import resolve_precision, resolve_sync_batchnorm
from animl_lightning.train.sampling import DistributedWeightedSampler, UnpaddedDistributedSampler
from animl_lightning.train.sweeps import SUMMARY_FILENAME
from tests.fixtures.datasets import make_prepared_dataset, squash_every_other_crop
from tests.fixtures.hydra import compose_train
from tests.fixtures.scripts import SCRIPT_OVERRIDES, run_train_script

SPLITS = ["train", "val", "test"]
# per_label=3 and 4 locations (2 train, 1 val, 1 test): 18 / 9 / 9 crops; 9 rows do not split evenly over 2 ranks,
# so a padding sampler would count one crop twice.
SPLIT_SIZES = {"train": 18, "val": 9, "test": 9}


# ---------------------------------------------------------------- samplers (fast)


@pytest.mark.parametrize(("size", "world"), [(9, 2), (10, 3), (7, 7), (1, 1)])
def test_unpadded_shards_cover_every_row_once(size: int, world: int) -> None:
    shards = [list(UnpaddedDistributedSampler(range(size), num_replicas=world, rank=r)) for r in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    assert [len(UnpaddedDistributedSampler(range(size), num_replicas=world, rank=r)) for r in range(world)] == [
        len(s) for s in shards
    ]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_unpadded_sampler_refuses_more_ranks_than_rows() -> None:
    with pytest.raises(ValueError, match="devices=1"):
        UnpaddedDistributedSampler(range(2), num_replicas=3, rank=2)


def test_weighted_shards_are_disjoint_parts_of_one_draw_per_epoch() -> None:
    weights = np.array([1.0, 1.0, 1.0, 1.0, 4.0, 0.0])
    samplers = [DistributedWeightedSampler(weights, num_replicas=2, rank=r, seed=7) for r in range(2)]
    single = DistributedWeightedSampler(weights, num_replicas=1, rank=0, seed=7)
    draws = []
    for epoch in (0, 1):
        for sampler in [*samplers, single]:
            sampler.set_epoch(epoch)
        shards = [list(s) for s in samplers]
        assert [len(s) for s in shards] == [3, 3]
        interleaved = [i for pair in zip(*shards, strict=True) for i in pair]
        assert interleaved == list(single)  # rank r holds positions r, r+2, ... of the common draw
        assert list(samplers[0]) == shards[0]  # deterministic for a given epoch
        draws.append(interleaved)
    assert draws[0] != draws[1]  # a new draw every epoch
    assert all(isinstance(s, DistributedSampler) for s in samplers)  # Lightning keeps it instead of re-wrapping

    big = DistributedWeightedSampler(weights, num_replicas=2, rank=0, seed=1, num_samples=20_000)
    counts = np.bincount(list(big), minlength=len(weights)) / len(big)
    assert counts[5] == 0 and counts[4] == pytest.approx(0.5, abs=0.03)


def test_weighted_sampler_validates_weights() -> None:
    with pytest.raises(ValueError, match="weights"):
        DistributedWeightedSampler([0.0, 0.0], num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="weights"):
        DistributedWeightedSampler([1.0, -1.0], num_replicas=1, rank=0)


def test_sync_batchnorm_only_on_cuda() -> None:
    assert resolve_sync_batchnorm(True, "cpu") is False
    assert resolve_sync_batchnorm(False, "gpu") is False
    assert resolve_sync_batchnorm(True, "gpu") is True
    assert resolve_sync_batchnorm(True, "auto") is torch.cuda.is_available()


def test_ddp_trainer_config_composes(tmp_path: Path) -> None:
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    cfg = compose_train(tmp_path, tmp_path, ["trainer=ddp", "trainer.devices=2", "trainer.num_nodes=1"])
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.use_distributed_sampler
    trainer = instantiate(
        cfg.trainer,
        accelerator="cpu",
        precision=resolve_precision(cfg.trainer.precision, "cpu"),
        sync_batchnorm=resolve_sync_batchnorm(cfg.trainer.sync_batchnorm, "cpu"),
        logger=False,
        callbacks=[],
    )
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.world_size == 2 and trainer.num_nodes == 1


def test_each_rank_resumes_with_its_own_generator_states() -> None:
    per_rank = [{"torch": torch.tensor([rank], dtype=torch.uint8)} for rank in range(2)]
    ddp = {RNG_STATES_KEY: per_rank[0], RNG_STATES_PER_RANK_KEY: per_rank}
    for rank in range(2):
        assert rng_states_to_restore(ddp, rank, 2) == (per_rank[rank], None)
    # One process continues as rank 0 did, but the batches are no longer those of the 2-process run.
    states, inexact = rng_states_to_restore(ddp, 0, 1)
    assert states is per_rank[0] and inexact is not None and "2 DDP processes" in inexact
    for rank in range(3):
        states, inexact = rng_states_to_restore(ddp, rank, 3)
        assert states is None and inexact is not None and "this run has 3" in inexact

    single = {RNG_STATES_KEY: per_rank[1]}
    assert rng_states_to_restore(single, 0, 1) == (per_rank[1], None)
    for rank in range(2):
        states, inexact = rng_states_to_restore(single, rank, 2)
        assert states is None and inexact is not None and "one process" in inexact
    for world in (1, 2):
        states, inexact = rng_states_to_restore({}, 0, world)
        assert states is None and inexact is not None and "no random generator states" in inexact


# ---------------------------------------------------------------- real process groups and fits (slow)


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared_dataset(tmp_path_factory.mktemp("ddp_data"), per_label=3)


def _loader_rank(rank: int, world: int, init_file: str, data_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(42)  # what seed_everything does on every rank
        module = CropDataModule(data_dir, batch_size=4, num_workers=0, image_size=32)
        module.set_data_config(
            {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
             "crop_pct": 1.0}
        )  # fmt: skip
        sampler = module.train_dataloader().sampler
        assert isinstance(sampler, DistributedWeightedSampler)
        epochs = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            epochs.append(list(sampler))
        result: dict[str, Any] = {"train": epochs, "seed": sampler.seed}
        for split in ("val", "test"):
            eval_sampler = module.eval_dataloader(split).sampler
            assert isinstance(eval_sampler, UnpaddedDistributedSampler)
            result[split] = list(eval_sampler)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_datamodule_shards_under_a_gloo_process_group(ddp_data: Path, tmp_path: Path) -> None:
    spawn(_loader_rank, args=(2, str(tmp_path / "init"), str(ddp_data), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["seed"] == ranks[1]["seed"] == 42
    weights = CropDataModule(str(ddp_data)).train_sample_weights()
    assert weights is not None
    for epoch in (0, 1):
        shards = [r["train"][epoch] for r in ranks]
        assert len(shards[0]) == len(shards[1]) == SPLIT_SIZES["train"] // 2
        reference = DistributedWeightedSampler(weights, num_replicas=1, rank=0, seed=42)
        reference.set_epoch(epoch)
        assert [i for pair in zip(*shards, strict=True) for i in pair] == list(reference)
    assert ranks[0]["train"][0] != ranks[0]["train"][1]  # a new draw every epoch
    for split in ("val", "test"):
        rows = ranks[0][split] + ranks[1][split]
        assert sorted(rows) == list(range(SPLIT_SIZES[split]))  # every crop once, none padded in


def read_tables(run: Path) -> dict[str, pd.DataFrame]:
    metrics = run / "metrics"
    tables = {
        name: pd.read_csv(metrics / f"{name}.csv")
        for name in ("per_label", "overall", "per_label_image", "per_label_sequence", "per_location")
    }
    tables.update({f"predictions_{s}": pd.read_csv(metrics / f"predictions_{s}.csv") for s in SPLITS})
    return tables


def check_unpadded(run: Path) -> None:
    per_label = pd.read_csv(run / "metrics" / "per_label.csv")
    assert per_label.groupby("split")["support"].sum().to_dict() == SPLIT_SIZES
    overall = pd.read_csv(run / "metrics" / "overall.csv")
    overall = overall[overall["level"] == "crop"].set_index("split")
    assert overall["n"].to_dict() == SPLIT_SIZES
    for split in SPLITS:
        predictions = pd.read_csv(run / "metrics" / f"predictions_{split}.csv")
        assert len(predictions) == SPLIT_SIZES[split] and predictions["path"].is_unique


@pytest.mark.slow
def test_ddp_tables_equal_a_single_process_evaluation(ddp_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    run_train_script(
        [
            f"data_dir={ddp_data}",
            *SCRIPT_OVERRIDES,
            "trainer=ddp",
            "trainer.devices=2",
            "trainer.max_epochs=2",
            "optimizer.lr=3e-3",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
    )
    assert (run / "train_ddp_process_1.log").is_file()  # rank 1 really ran, in the same run folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]
    check_unpadded(run)

    single = tmp_path / "single"
    cfg = compose_train(
        ddp_data, single, ["train=false", f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", "trainer.devices=1"]
    )
    value = train_script.train(cfg)
    distributed, reference = read_tables(run), read_tables(single)
    for name, frame in reference.items():
        pd.testing.assert_frame_equal(distributed[name], frame, rtol=1e-4, obj=name)
    ddp_results = json.loads((run / "results.json").read_text())
    assert value == pytest.approx(ddp_results["monitor_value"])


@pytest.mark.slow
def test_sweep_of_ddp_jobs(ddp_data: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_train_script(
        [
            "-m",
            f"data_dir={ddp_data}",
            *SCRIPT_OVERRIDES,
            "trainer=ddp",
            "trainer.devices=2",
            "optimizer.lr=1e-3,3e-4",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    # Lightning's children re-ran their own job (not the whole sweep) into the job's folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    summary = pd.read_csv(sweep / SUMMARY_FILENAME)
    assert list(summary["status"]) == ["COMPLETED", "COMPLETED"]
    assert list(summary["optimizer.lr"]) == [1e-3, 3e-4]
    for job in ("0", "1"):
        assert (sweep / job / "train_ddp_process_1.log").is_file()
        check_unpadded(sweep / job)


@pytest.fixture(scope="module")
def mixed_shape_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ddp_data`` with every other crop squashed (see :func:`squash_every_other_crop`)."""
    return squash_every_other_crop(make_prepared_dataset(tmp_path_factory.mktemp("mixed_shape_data"), per_label=3))


def max_weight_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


@pytest.mark.slow
def test_ddp_resume_from_last_checkpoint_is_exact(mixed_shape_data: Path, tmp_path: Path) -> None:
    def fit(run: Path, *extra: str) -> None:
        run_train_script(
            [
                f"data_dir={mixed_shape_data}",
                *SCRIPT_OVERRIDES,
                "trainer=ddp",
                "trainer.devices=2",
                # the same cosine schedule whether the run stops after epoch 2 or not
                "scheduler.T_max=3",
                "test=false",
                f"hydra.run.dir={run}",
                *extra,
            ],
            cwd=tmp_path,
        )

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    fit(reference, "trainer.max_epochs=3")
    fit(resumed, "trainer.max_epochs=2")
    last = resumed / "checkpoints" / "last.ckpt"
    stopped = torch.load(last, map_location="cpu", weights_only=True)
    assert stopped["epoch"] == 1
    per_rank = stopped[RNG_STATES_PER_RANK_KEY]
    assert len(per_rank) == 2
    assert torch.equal(per_rank[0]["torch"], stopped[RNG_STATES_KEY]["torch"])  # indexed by global rank
    assert not torch.equal(per_rank[0]["torch"], per_rank[1]["torch"])

    fit(resumed, "trainer.max_epochs=3", f"ckpt_path={last}")
    expected = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    got = torch.load(last, map_location="cpu", weights_only=True)
    assert (got["epoch"], got["global_step"]) == (expected["epoch"], expected["global_step"]) == (2, 6)
    assert max_weight_difference(got["state_dict"], expected["state_dict"]) == 0.0
    assert "not bit-exact" not in (resumed / "train.log").read_text()
    for name in ("overall.csv", "per_label.csv", "predictions_val.csv"):
        assert (resumed / "metrics" / name).read_bytes() == (reference / "metrics" / name).read_bytes(), name
