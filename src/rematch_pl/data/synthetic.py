"""A small synthetic dataset in exactly the MMEB layouts, for CPU end-to-end runs and tests.

``generate_synthetic(out_dir)`` writes, deterministically from ``seed``::

    out_dir/train/README.md                                  dataset card, one config per subset
    out_dir/train/<Subset>/original-00000-of-00001.parquet   MMEB-train columns
    out_dir/train/images/<Subset>/*.png                      image_root = out_dir/train
    out_dir/hardneg/<Subset>/original-00000-of-00001.parquet mmE5 layout (stringified lists)
    out_dir/eval/README.md, out_dir/eval/<Subset>/test-00000-of-00001.parquet
    out_dir/eval/images/<Subset>/*.png                       image_root = out_dir/eval

The scenes are PIL-drawn coloured shapes (3 shapes x 4 colours, counts 1-3, positions
left/right/top/bottom) on 64 px canvases: a concept space small enough for a tiny
random-init backbone with LoRA to learn in a few hundred CPU steps. One subset per kind
of MMEB task:

* ``Syn_CLS`` image -> label ("red circle"); eval candidates: all 12 labels.
* ``Syn_VQA`` image + question ("How many circles are there?") -> answer ("two").
* ``Syn_T2I`` caption ("two red circles") -> image.
* ``Syn_I2T`` image -> caption.
* ``Syn_VG``  image + 'Select the portion ... labeled as "red circle"' -> crop of that object.

Hard negatives are real hard negatives: the same scene with another colour, an
off-by-one count, another shape, or a crop of another object of the same image; a
negative never equals the positive. Eval candidates: the positive first, then hard
ones, then random others of a different concept. About 5% of the hard-negative lists
start with an empty entry, as in the upstream data (the readers skip it).

Generation is idempotent: a complete folder (marked by ``synthetic.json``) made with the
same arguments is reused; it is built in a temporary folder and renamed into place.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

from rematch_pl.data.mmeb import DataError
from rematch_pl.folders import build_once

SUBSETS = ("Syn_CLS", "Syn_VQA", "Syn_T2I", "Syn_I2T", "Syn_VG")
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (235, 195, 20)}
COLOUR_NAMES = tuple(COLOURS)
COUNTS = ("one", "two", "three")
POSITIONS = ("left", "right", "top", "bottom")
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

CLS_QUERY = "<|image_1|>\nRepresent the given image for classification.\n"
VQA_QUERY = "<|image_1|>\nRepresent the given image with the following question: {}\n"
T2I_QUERY = "Find me an everyday image that matches the given caption: {}.\n"
I2T_QUERY = "<|image_1|>\nFind an image caption describing the given everyday image.\n"
VG_QUERY = '<|image_1|>\nSelect the portion of the image that isolates the object labeled as "{}"\n'
IMAGE_DOC = "<|image_1|>\nRepresent the given image.\n"
CROP_DOC = "<|image_1|>\nRepresent the given cropped image of the object.\n"

MARKER = "synthetic.json"
FORMAT_VERSION = 1


# ====================================================================== drawing
def _canvas(rng: random.Random, size: int) -> Image.Image:
    v = rng.randint(228, 255)
    return Image.new("RGB", (size, size), (v, v, v))


def _draw(img: Image.Image, shape: str, colour: str, cx: float, cy: float, r: float) -> None:
    d = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.88
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)


def _cell_centre(cell: int, size: int, rng: random.Random) -> tuple[float, float]:
    """Centre of one of the 4 cells of a 2x2 grid, slightly jittered."""
    half = size / 2
    j = size * 0.03
    return (cell % 2) * half + half / 2 + rng.uniform(-j, j), (cell // 2) * half + half / 2 + rng.uniform(-j, j)


def single_object(rng: random.Random, size: int, colour: str, shape: str) -> Image.Image:
    """One big object near the centre."""
    img = _canvas(rng, size)
    j = size * 0.08
    _draw(img, shape, colour, size / 2 + rng.uniform(-j, j), size / 2 + rng.uniform(-j, j),
          size * rng.uniform(0.28, 0.36))
    return img


def cell_scene(rng: random.Random, size: int, objects: list[tuple[str, str]]) -> tuple[Image.Image, list[int]]:
    """Up to 4 (colour, shape) objects, each in its own cell of a 2x2 grid; returns the cells used."""
    img = _canvas(rng, size)
    cells = rng.sample(range(4), len(objects))
    for (colour, shape), cell in zip(objects, cells):
        cx, cy = _cell_centre(cell, size, rng)
        _draw(img, shape, colour, cx, cy, size / 2 * rng.uniform(0.32, 0.4))
    return img, cells


def position_scene(rng: random.Random, size: int, colour: str, shape: str, position: str,
                   distractor: tuple[str, str] | None) -> Image.Image:
    """An object at the left/right/top/bottom edge; a distractor on the opposite side."""
    img = _canvas(rng, size)
    spots = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8)}
    r = size * rng.uniform(0.15, 0.18)
    x, y = spots[position]
    _draw(img, shape, colour, x * size, y * size, r)
    if distractor is not None:
        x, y = spots[_OPPOSITE[position]]
        _draw(img, distractor[1], distractor[0], x * size, y * size, r)
    return img


def crop_cell(img: Image.Image, cell: int, size: int) -> Image.Image:
    """One cell of a 2x2 scene, scaled back to `size` (the grounding targets)."""
    half = size // 2
    x0, y0 = (cell % 2) * half, (cell // 2) * half
    return img.crop((x0, y0, x0 + half, y0 + half)).resize((size, size), Image.Resampling.BILINEAR)


def object_crop(rng: random.Random, size: int, colour: str, shape: str) -> Image.Image:
    """A crop of a fresh one-object scene: looks like a grounding target of another image."""
    img, cells = cell_scene(rng, size, [(colour, shape)])
    return crop_cell(img, cells[0], size)


# ====================================================================== concepts
def caption(count: int, colour: str, shape: str) -> str:
    return f"{COUNTS[count - 1]} {colour} {shape if count == 1 else PLURAL[shape]}"


def hard_concepts(concept: tuple[int, str, str], rng: random.Random) -> list[tuple[int, str, str]]:
    """Concepts one edit away: another colour, an off-by-one count, another shape (shuffled)."""
    k, c, s = concept
    out = [(k, rng.choice([x for x in COLOURS if x != c]), s),
           (rng.choice([x for x in (k - 1, k + 1) if 1 <= x <= 3]), c, s),
           (k, c, rng.choice([x for x in SHAPES if x != s]))]
    rng.shuffle(out)
    return out


def _random_concept(rng: random.Random) -> tuple[int, str, str]:
    return rng.randint(1, 3), rng.choice(COLOUR_NAMES), rng.choice(SHAPES)


def _all_concepts() -> list[tuple[int, str, str]]:
    return [(k, c, s) for k in (1, 2, 3) for c in COLOURS for s in SHAPES]


def _labels() -> list[str]:
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


class _Images:
    """Saves PNGs under ``<root>/images/<subset>/`` and returns the path relative to ``root``."""

    def __init__(self, root: Path, subset: str):
        self.root, self.rel = root, f"images/{subset}"
        (root / self.rel).mkdir(parents=True, exist_ok=True)
        self.n = 0

    def save(self, img: Image.Image, tag: str) -> str:
        rel = f"{self.rel}/{self.n:05d}_{tag}.png"
        self.n += 1
        img.save(self.root / rel, compress_level=1)
        return rel


# ====================================================================== one example per task
# Each maker returns (query (text, image), positive (text, image), hard negatives
# [(text, image)], eval candidates after the positive [(text, image)]); `images` saves.
def _make_cls(rng, size, images, n_cand, for_eval):
    c, s = rng.choice(COLOUR_NAMES), rng.choice(SHAPES)
    label = f"{c} {s}"
    hard = [f"{x} {s}" for x in COLOURS if x != c] + [f"{c} {x}" for x in SHAPES if x != s]
    rng.shuffle(hard)
    rest = [x for x in _labels() if x != label and x not in hard]
    q = (CLS_QUERY, images.save(single_object(rng, size, c, s), "q"))
    negs = [(t, "") for t in hard[: rng.randint(1, 3)]]
    cands = [(t, "") for t in hard + rest] if for_eval else []  # all labels
    return q, (label, ""), negs, cands


def _make_vqa(rng, size, images, n_cand, for_eval):
    kind = rng.choice(("count", "color", "position"))
    c, s = rng.choice(COLOUR_NAMES), rng.choice(SHAPES)
    other = (rng.choice([x for x in COLOURS if x != c]), rng.choice([x for x in SHAPES if x != s]))
    if kind == "count":
        k = rng.randint(1, 3)
        objects = [(rng.choice(COLOUR_NAMES), s) for _ in range(k)] + ([other] if rng.random() < 0.5 else [])
        img, _ = cell_scene(rng, size, objects)
        question, answer = f"How many {PLURAL[s]} are there?", COUNTS[k - 1]
        near = [COUNTS[x - 1] for x in (k - 1, k + 1) if 1 <= x <= 3]
        hard = near + [x for x in COUNTS if x != answer and x not in near]
        vocab = COUNTS
    elif kind == "color":
        objects = [(c, s)] + ([other] if rng.random() < 0.5 else [])
        img, _ = cell_scene(rng, size, objects)
        question, answer = f"What color is the {s}?", c
        rest = [x for x in COLOURS if x not in (c, other[0])]
        rng.shuffle(rest)
        hard = ([other[0]] if len(objects) > 1 else []) + rest + ([] if len(objects) > 1 else [other[0]])
        vocab = COLOUR_NAMES
    else:
        p = rng.choice(POSITIONS)
        img = position_scene(rng, size, c, s, p, other if rng.random() < 0.5 else None)
        question, answer = f"Where is the {c} {s}?", p
        hard = [_OPPOSITE[p]] + [x for x in POSITIONS if x not in (p, _OPPOSITE[p])]
        vocab = POSITIONS
    q = (VQA_QUERY.format(question), images.save(img, "q"))
    negs = [(t, "") for t in hard[: rng.randint(1, 2)]]
    cands = []
    if for_eval:
        others = [x for v in (COUNTS, COLOUR_NAMES, POSITIONS) if v is not vocab for x in v]
        rng.shuffle(others)
        cands = [(t, "") for t in (hard + others)[: n_cand - 1]]
    return q, (answer, ""), negs, cands


def _concept_image(rng, size, concept):
    k, c, s = concept
    return cell_scene(rng, size, [(c, s)] * k)[0]


def _make_t2i(rng, size, images, n_cand, for_eval, pool=None):
    concept = _random_concept(rng)
    q = (T2I_QUERY.format(caption(*concept)), "")
    pos = (IMAGE_DOC, images.save(_concept_image(rng, size, concept), "pos"))
    hard = hard_concepts(concept, rng)
    if not for_eval:
        negs = [(IMAGE_DOC, images.save(_concept_image(rng, size, h), "neg")) for h in hard[: rng.randint(1, 3)]]
        return q, pos, negs, []
    near = [(IMAGE_DOC, rng.choice(pool[h])) for h in hard]
    far = [(IMAGE_DOC, p) for con, paths in pool.items() if con != concept and con not in hard for p in paths]
    rng.shuffle(far)
    return q, pos, [], (near + far)[: n_cand - 1]


def _make_i2t(rng, size, images, n_cand, for_eval):
    concept = _random_concept(rng)
    q = (I2T_QUERY, images.save(_concept_image(rng, size, concept), "q"))
    hard = [caption(*h) for h in hard_concepts(concept, rng)]
    negs = [(t, "") for t in hard[: rng.randint(1, 3)]]
    cands = []
    if for_eval:
        far = [caption(*x) for x in _all_concepts() if x != concept and caption(*x) not in hard]
        rng.shuffle(far)
        cands = [(t, "") for t in (hard + far)[: n_cand - 1]]
    return q, (caption(*concept), ""), negs, cands


def _make_vg(rng, size, images, n_cand, for_eval, pool=None):
    labels = rng.sample([(c, s) for c in COLOURS for s in SHAPES], rng.randint(2, 3))
    img, cells = cell_scene(rng, size, labels)
    target = rng.randrange(len(labels))
    c, s = labels[target]
    q = (VG_QUERY.format(f"{c} {s}"), images.save(img, "q"))
    pos = (CROP_DOC, images.save(crop_cell(img, cells[target], size), "pos"))
    same_image = [(CROP_DOC, images.save(crop_cell(img, cells[i], size), "crop"))
                  for i in range(len(labels)) if i != target]
    if not for_eval:
        # the other objects of the image, then the same shape in another colour
        recoloured = object_crop(rng, size, rng.choice([x for x in COLOURS if x != c]), s)
        negs = same_image + [(CROP_DOC, images.save(recoloured, "neg"))]
        return q, pos, negs[: rng.randint(1, 3)], []
    far = [(CROP_DOC, p) for label, paths in pool.items() if label != (c, s) for p in paths]
    rng.shuffle(far)
    return q, pos, [], (same_image + far)[: n_cand - 1]


_MAKERS = {"Syn_CLS": _make_cls, "Syn_VQA": _make_vqa, "Syn_T2I": _make_t2i, "Syn_I2T": _make_i2t,
           "Syn_VG": _make_vg}


def _eval_pool(subset, rng, size, images):
    """Shared candidate images of the retrieval-style eval subsets (two per concept)."""
    if subset == "Syn_T2I":
        return {con: [images.save(_concept_image(rng, size, con), "pool") for _ in range(2)]
                for con in _all_concepts()}
    if subset == "Syn_VG":
        return {(c, s): [images.save(object_crop(rng, size, c, s), "pool") for _ in range(2)]
                for c in COLOURS for s in SHAPES}
    return None


# ====================================================================== writing
def _write_parquet(path: Path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _write_card(root: Path, split: str, title: str) -> None:
    lines = ["---", "configs:"]
    for s in SUBSETS:
        lines += [f"- config_name: {s}", "  data_files:", f"  - split: {split}", f"    path: {s}/{split}-*"]
    lines += ["---", f"# {title}", "", "Synthetic shapes data written by rematch_pl.data.synthetic.", ""]
    (root / "README.md").write_text("\n".join(lines))


def _train_subset(root: Path, subset: str, seed: int, n: int, size: int):
    rng = random.Random(f"{seed}|train|{subset}")
    images = _Images(root / "train", subset)
    rows, hardneg = [], []
    for _ in range(n):
        (qt, qi), (pt, pi), negs, _ = _MAKERS[subset](rng, size, images, 0, False)
        rows.append(dict(qry=qt, qry_image_path=qi, pos_text=pt, pos_image_path=pi,
                         neg_text=negs[0][0], neg_image_path=negs[0][1]))
        listed = ([("", "")] if rng.random() < 0.05 else []) + negs  # an empty entry, as upstream
        hardneg.append(dict(qry=qt, qry_image_path=qi, pos_text=pt, pos_image_path=pi,
                            neg_text=str([t for t, _ in listed]), neg_image_path=str([p for _, p in listed])))
    rng.shuffle(hardneg)  # joined by key, not by position
    for folder, table in (("train", rows), ("hardneg", hardneg)):
        _write_parquet(root / folder / subset / "original-00000-of-00001.parquet",
                       {c: [r[c] for r in table] for c in table[0]})


def _eval_subset(root: Path, subset: str, seed: int, n: int, size: int, n_cand: int):
    rng = random.Random(f"{seed}|eval|{subset}")
    images = _Images(root / "eval", subset)
    pool = _eval_pool(subset, rng, size, images)
    cols = {"qry_text": [], "qry_img_path": [], "tgt_text": [], "tgt_img_path": []}
    for _ in range(n):
        maker = _MAKERS[subset]
        args = (rng, size, images, n_cand, True) + ((pool,) if pool is not None else ())
        (qt, qi), pos, _, cands = maker(*args)
        targets = [pos] + cands
        cols["qry_text"].append(qt)
        cols["qry_img_path"].append(qi)
        cols["tgt_text"].append([t for t, _ in targets])
        cols["tgt_img_path"].append([p for _, p in targets])
    _write_parquet(root / "eval" / subset / "test-00000-of-00001.parquet", cols)


def generate_synthetic(out_dir: str | os.PathLike, seed: int = 0, n_train_per_subset: int = 400,
                       n_eval_queries: int = 100, image_size: int = 64, n_candidates: int = 12) -> Path:
    """Write the synthetic dataset to `out_dir` (reused when already complete); returns its path.

    Paths for the data config: train ``out_dir/train`` (image_root the same), hard
    negatives ``out_dir/hardneg`` (image_root ``out_dir/train``), eval ``out_dir/eval``.
    """
    if n_train_per_subset < 1 or n_eval_queries < 1:
        raise ValueError("n_train_per_subset and n_eval_queries must be >= 1")
    if image_size < 56:
        raise ValueError(f"image_size must be >= 56 (crops are half an image), got {image_size}")
    if n_candidates < 2:
        raise ValueError(f"n_candidates must be >= 2, got {n_candidates}")
    params = dict(format_version=FORMAT_VERSION, seed=seed, n_train_per_subset=n_train_per_subset,
                  n_eval_queries=n_eval_queries, image_size=image_size, n_candidates=n_candidates)
    return build_once(out_dir, MARKER, params, lambda tmp: _write_dataset(
        tmp, seed, n_train_per_subset, n_eval_queries, image_size, n_candidates), DataError)


def _write_dataset(tmp: Path, seed: int, n_train_per_subset: int, n_eval_queries: int, image_size: int,
                   n_candidates: int) -> None:
    for subset in SUBSETS:
        _train_subset(tmp, subset, seed, n_train_per_subset, image_size)
        _eval_subset(tmp, subset, seed, n_eval_queries, image_size, n_candidates)
    _write_card(tmp / "train", "original", "Synthetic MMEB-train")
    _write_card(tmp / "hardneg", "original", "Synthetic hard negatives (mmE5 layout)")
    _write_card(tmp / "eval", "test", "Synthetic MMEB-eval")


def synthetic_paths(out_dir: str | os.PathLike) -> dict[str, str]:
    """Where the parts of a synthetic dataset live (for data configs)."""
    out = Path(out_dir)
    return {"train": str(out / "train"), "train_images": str(out / "train"), "hardneg": str(out / "hardneg"),
            "eval": str(out / "eval"), "eval_images": str(out / "eval")}
