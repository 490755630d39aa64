"""Writers of small datasets in the exact MMEB layouts (helpers of the data tests)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rematch_pl.data.mmeb import TRAIN_COLUMNS

PH = "<|image_1|>"


def write_card(root: Path, subsets, split: str) -> None:
    lines = ["---", "configs:"]
    for s in subsets:
        lines += [f"- config_name: {s}", "  data_files:", f"  - split: {split}", f"    path: {s}/{split}-*"]
    (root / "README.md").write_text("\n".join(lines + ["---", "# test data", ""]))


def write_parquet(root: Path, subset: str, split: str, rows: list[dict], shards: int = 1) -> None:
    """Rows of one subset as `<root>/<subset>/<split>-0000i-of-0000n.parquet` (contiguous shards)."""
    (root / subset).mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    for k in range(shards):
        part = rows[k * per:(k + 1) * per]
        cols = {c: [r[c] for r in part] for c in rows[0]}
        pq.write_table(pa.table(cols), root / subset / f"{split}-{k:05d}-of-{shards:05d}.parquet")


def save_png(root: Path, rel: str, size=(40, 40), colour=(200, 30, 30)) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return rel


def train_row(qry="", qry_image_path="", pos_text="", pos_image_path="", neg_text="", neg_image_path=""):
    row = dict(qry=qry, qry_image_path=qry_image_path, pos_text=pos_text, pos_image_path=pos_image_path,
               neg_text=neg_text, neg_image_path=neg_image_path)
    assert tuple(row) == TRAIN_COLUMNS
    return row


def make_train(root: Path, subsets: dict[str, int], shards: int = 1, split: str = "original") -> Path:
    """A small MMEB-train clone: per subset n rows alternating image->text and text->image."""
    for subset, n in subsets.items():
        rows = []
        for i in range(n):
            if i % 2 == 0:
                img = save_png(root, f"images/{subset}/q{i}.png", colour=(i % 250, 10, 10))
                rows.append(train_row(f"{PH}\nRepresent the given image for classification.\n", img,
                                      f"label {i}", "", f"wrong label {i}", ""))
            else:
                img = save_png(root, f"images/{subset}/p{i}.png", colour=(10, i % 250, 10))
                neg = save_png(root, f"images/{subset}/n{i}.png", colour=(10, 10, i % 250))
                rows.append(train_row(f"Find me an everyday image that matches the given caption: caption {i}.", "",
                                      f"{PH}\nRepresent the given image.\n", img,
                                      f"{PH}\nRepresent the given image.\n", neg))
        write_parquet(root, subset, split, rows, shards)
    write_card(root, list(subsets), split)
    return root
