"""MMEBDataModule: argument validation, synthetic defaults, train/val dataloaders, eval layout."""

from collections import Counter

import pytest
import torch

from rematch_pl.data.datamodule import EvalItems, MMEBDataModule
from rematch_pl.data.mmeb import DataError
from rematch_pl.data.synthetic import SUBSETS

SYN = dict(n_train_per_subset=40, n_eval_queries=10, n_candidates=8)


@pytest.fixture
def dm(synthetic_dir, processor):
    m = MMEBDataModule(synthetic=dict(SYN, out_dir=str(synthetic_dir)), batch_size=4, eval_batch_size=16,
                       homogeneous=True, target_instruction="default", max_length=64)
    m.set_processor(processor)
    m.prepare_data()
    m.setup("fit")
    return m


@pytest.mark.parametrize("kwargs,match", [
    (dict(on_bad_row="ignore"), "on_bad_row"),
    (dict(num_hardneg=-1), "num_hardneg"),
    (dict(batch_size=0), "batch_size"),
    (dict(num_workers=1.5), "num_workers"),
    (dict(max_length=0), "max_length"),
    (dict(train={"path": "x", "imageroot": "y"}), "unknown key.*imageroot"),
    (dict(eval={"path": "x", "max_queries": 0}), "max_queries"),
    (dict(synthetic={"seed": 1}), "out_dir"),
    (dict(synthetic={"out_dir": "x", "n_rows": 1}), "unknown key.*n_rows"),
    (dict(target_instruction=5), "target_instruction"),
])
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MMEBDataModule(**kwargs)


def test_image_roots_are_checked_at_start_up(tmp_path):
    with pytest.raises(DataError, match=r"data.train.image_root='/nonexistent/img': no such folder"):
        MMEBDataModule(train={"path": "TIGER-Lab/MMEB-train", "image_root": "/nonexistent/img"})
    with pytest.raises(DataError, match=r"data.eval.image_root is not set and data.eval.path='TIGER-Lab/MMEB-eval' "
                                        r"is a hub id, which holds no images"):
        MMEBDataModule(eval={"path": "TIGER-Lab/MMEB-eval"})
    MMEBDataModule(train={"path": str(tmp_path)}, eval={"path": "TIGER-Lab/MMEB-eval", "image_root": str(tmp_path)})


def test_synthetic_paths_default_into_out_dir(tmp_path):
    m = MMEBDataModule(synthetic={"out_dir": str(tmp_path / "s")}, eval={"max_queries": 5})
    assert m.train_cfg["path"] == str(tmp_path / "s" / "train") == m.train_cfg["image_root"]
    assert m.hardneg_cfg["path"] == str(tmp_path / "s" / "hardneg")
    assert m.hardneg_cfg["image_root"] == str(tmp_path / "s" / "train")
    assert m.eval_cfg["path"] == str(tmp_path / "s" / "eval") and m.eval_cfg["max_queries"] == 5
    given = MMEBDataModule(synthetic={"out_dir": str(tmp_path / "s")}, train={"path": "/elsewhere"})
    assert given.train_cfg["path"] == "/elsewhere"


def test_processor_required(synthetic_dir):
    m = MMEBDataModule(synthetic=dict(SYN, out_dir=str(synthetic_dir)))
    with pytest.raises(RuntimeError, match="set_processor"):
        m.train_dataloader()


def test_train_dataloader(dm, processor):
    it = iter(dm.train_dataloader())
    for _ in range(5):
        batch = next(it)
        assert batch["qry"]["ids"].shape[0] == 4 and batch["neg"]["ids"].shape[0] == 4
        assert len(set(batch["subset"])) == 1  # homogeneous
        assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
        assert int(batch["qry"]["lengths"].max()) <= 64


def test_eval_layout_global_numbering(dm):
    assert list(dm.eval_layout) == list(SUBSETS) and set(dm.eval_sets) == set(SUBSETS)
    offset = 0
    for subset, layout in dm.eval_layout.items():
        es = dm.eval_sets[subset]
        assert layout["offset"] == offset and layout["num_items"] == len(es.items)
        assert layout["queries"] == [offset + q for q in es.queries]
        for g_cands, cands in zip(layout["candidates"], es.candidates):
            assert g_cands == [offset + c for c in cands]
            assert dm.eval_items[g_cands[0]][0] == es.items[cands[0]][0]  # positive first, same item
        offset += len(es.items)
    assert dm.num_eval_items == offset


def test_val_dataloader_covers_every_item_once(dm, processor):
    seen = Counter()
    for batch in dm.val_dataloader():
        assert set(batch) == {"items", "pixel_values", "image_grid_thw", "item_index"}
        seen.update(batch["item_index"].tolist())
        ids = batch["items"]["ids"]
        n_img = (ids == processor.image_token_id).sum(1)
        has = batch["items"]["image"] >= 0
        assert (n_img[has] > 0).all() and (n_img[~has] == 0).all()
    assert sorted(seen) == list(range(dm.num_eval_items)) and set(seen.values()) == {1}


@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (2, 4)])
def test_eval_items_sharded_equally(n, world):
    items = [(f"t{i}", None) for i in range(n)]
    shards = [list(EvalItems(items, r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of batches on every rank
    assert {k for s in shards for k, _, _ in s} == set(range(n))
    assert shards[1][0][0] == 1 % n  # strided: rank r starts at item r


def test_bad_rows_collected_from_batches_each_row_once_and_saved(dm, synthetic_dir):
    batch = {"qry": {}, "bad_rows": [("Syn_VG", 3, "missing image"), ("Syn_VG", 5, "missing image")]}
    out = dm.on_before_batch_transfer(batch, 0)
    # row 3 again (another worker met its undecodable image, or a later pass): counted once
    dm.on_before_batch_transfer({"bad_rows": [("Syn_VG", 3, "missing image"), ("Syn_VG", 8, "empty query")]}, 0)
    assert "bad_rows" not in out
    assert dm.bad_rows == {"Syn_VG": Counter({"missing image": 2, "empty query": 1})} and dm.bad_row_count == 3
    assert dm.all_bad_rows() == {"Syn_VG": {"missing image": 2, "empty query": 1}}
    resumed = MMEBDataModule(synthetic=dict(SYN, out_dir=str(synthetic_dir)), batch_size=4)
    resumed.load_state_dict(dm.state_dict())  # the counts go on from the checkpoint's
    resumed.on_before_batch_transfer({"bad_rows": [("Syn_VG", 8, "empty query"), ("Syn_VG", 9, "empty query")]}, 0)
    assert resumed.bad_rows == {"Syn_VG": Counter({"missing image": 2, "empty query": 2})}


def test_hydra_style_config(synthetic_dir, processor):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"train": {"caps": {"Syn_CLS": 8}, "weights": None}, "eval": {"subsets": ["Syn_CLS"]},
                            "synthetic": dict(SYN, out_dir=str(synthetic_dir))})
    m = MMEBDataModule(train=cfg.train, eval=cfg.eval, synthetic=cfg.synthetic, batch_size=2, num_hardneg=0)
    m.set_processor(processor)
    m.setup("fit")
    assert list(m.eval_layout) == ["Syn_CLS"]
    stream = m.train_stream()
    assert stream.caps == {"Syn_CLS": 8} and stream.sizes["Syn_CLS"] == 8
    batch = next(iter(m.train_dataloader()))
    assert batch["neg"] is None and isinstance(batch["qry"]["ids"], torch.Tensor)


def test_dataloader_workers(synthetic_dir, processor):
    m = MMEBDataModule(synthetic=dict(SYN, out_dir=str(synthetic_dir)), batch_size=4, eval_batch_size=32,
                       num_workers=2, eval={"subsets": ["Syn_CLS", "Syn_VG"]})
    m.set_processor(processor)
    m.setup("fit")
    loader = m.train_dataloader()
    assert loader.persistent_workers
    it = iter(loader)
    rows = [r for _ in range(6) for r in next(it)["row_id"]]
    assert len(rows) == 24 and len(set(rows)) == 24  # the two workers hold disjoint shards
    seen = Counter(i for b in m.val_dataloader() for i in b["item_index"].tolist())
    assert sorted(seen) == list(range(m.num_eval_items)) and set(seen.values()) == {1}


def test_transfer_moves_the_payload_and_keeps_packing_metadata_on_the_host(dm):
    """A real train batch and a real val batch; `meta` stands for the GPU (no copy of values)."""
    from rematch_pl.data.collate import HOST_KEYS

    train = next(iter(dm.train_dataloader()))
    val = next(iter(dm.val_dataloader()))
    for batch in (train, val):
        moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
        assert list(moved) == list(batch)
        assert moved["pixel_values"].is_meta
        for key in HOST_KEYS:
            if key in batch:  # the same host tensors: nothing copied, nothing read back from a device
                assert moved[key] is batch[key]
                leaves = batch[key].values() if isinstance(batch[key], dict) else [batch[key]]
                assert all(t is None or t.device.type == "cpu" for t in leaves)
    assert moved["item_index"].is_meta  # gathered across ranks at the end of validation: on the device
    assert set(HOST_KEYS) >= {"qry", "pos", "neg", "image_grid_thw"} & set(train)


def test_resume_warns_when_the_batch_layout_changed(dm, caplog):
    """The checkpoint names what decides a batch's rows; a resume that changes one of them says
    that rows will repeat or be skipped (the number of workers does not matter)."""
    state = dm.state_dict()
    assert state["stream_layout"] == {"world_size": 1, "batch_size": 4, "homogeneous": True, "seed": 0}
    dm.load_state_dict({"train_batches_consumed": 3, "stream_layout": state["stream_layout"]})
    caplog.clear()
    dm.train_dataloader()
    assert not [r for r in caplog.records if "resuming with a different" in r.getMessage()]
    dm.load_state_dict({"train_batches_consumed": 3, "stream_layout": dict(state["stream_layout"], batch_size=8)})
    dm.train_dataloader()
    assert any("batch_size 8 -> 4" in r.getMessage() and "repeat" in r.getMessage() for r in caplog.records)
