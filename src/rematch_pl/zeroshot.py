"""Readers of the zero-shot sets of the paper's Table 2, and a synthetic stand-in for each.

Two kinds of set:

* `RetrievalSet` (Flickr30K, COCO 5k, ShareGPT4V-1k, Urban1K): an image pool and a caption pool,
  each caption belonging to one image. Text->image: each caption ranks the whole image pool;
  image->text: each image ranks the whole caption pool, a hit when any of its captions is there.
  Captions with the very same text are one item (`RetrievalSet.positives`): such a caption of
  another image is a positive of the image, not a competitor that ties with its own caption (a
  strict miss), and as a query it has each of those images as a positive.
* `ChoiceSet` (SugarCrepe): for each image a positive caption and its hard negative; accuracy =
  how often the positive scores strictly higher.

Layouts read (``layout: auto`` picks by looking at the path):

=============  ================================================================================
``karpathy``   Karpathy split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``):
               ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}]}]}``; the
               ``split`` (default ``test``: Flickr30K 1k, COCO 5k) is kept; image file =
               ``image_root/filepath/filename``.
``lavis``      BLIP / LAVIS retrieval JSON (``flickr30k_test.json``, ``coco_karpathy_test.json``):
               a list of ``{"image": relative path, "caption": [captions]}``.
``sharegpt4v`` ShareGPT4V caption JSON (``share-captioner_coco_lcs_sam_1246k_1107.json``, as used by
               Long-CLIP): a list of ``{"image", "conversations": [..., {"from": "gpt", "value"}]}``;
               the first ``limit`` (1000) entries.
``urban1k``    Urban1K as released with Long-CLIP: ``<root>/image/<name>.jpg`` and
               ``<root>/caption/<name>.txt``.
``sugarcrepe`` SugarCrepe's ``data/`` folder: ``{replace_obj, replace_att, replace_rel, swap_obj,
               swap_att, add_obj, add_att}.json``, each ``{id: {"filename", "caption",
               "negative_caption"}}``; images from COCO val2017 (``image_root``). Every part must
               be there (a missing one is an error naming it), unless ``parts`` lists the ones to
               run (``eval.zeroshot.sets.sugarcrepe.parts=[replace_obj,...]``).
``mmeb``       The same data in the MMEB-eval layout (as written by `to_mmeb_layout`): a folder of
               subsets ``<Set>_t2i`` (a row per caption: ``qry_text`` the caption, ``tgt_img_path``
               the image pool with the caption's image first) and ``<Set>_i2t`` (a row per image,
               ``tgt_text`` the caption pool with one of its captions first), and for SugarCrepe
               ``SugarCrepe_<part>`` (``qry_img_path`` the image, ``tgt_text`` [positive, negative]).
               Prompts are not stored: the evaluation applies them as for the other layouts.
=============  ================================================================================

Captions beyond ``captions_per_image`` (5) per image are dropped, as in the standard protocol.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

SETS = ("flickr30k", "coco", "sharegpt4v", "urban1k", "sugarcrepe")
RETRIEVAL_SETS = SETS[:4]
MMEB_NAMES = {"flickr30k": "Flickr30K", "coco": "COCO", "sharegpt4v": "ShareGPT4V", "urban1k": "Urban1K",
              "sugarcrepe": "SugarCrepe"}
SUGARCREPE_PARTS = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
SUGARCREPE_GROUPS = ("replace", "swap", "add")
LAYOUTS = ("auto", "karpathy", "lavis", "sharegpt4v", "urban1k", "sugarcrepe", "mmeb")


class ZeroShotDataError(ValueError):
    pass


@dataclass
class RetrievalSet:
    name: str
    images: list[str] = field(default_factory=list)  # as the dataset names them (relative to image_root)
    captions: list[str] = field(default_factory=list)
    caption_image: list[int] = field(default_factory=list)  # image of each caption
    image_root: str = ""

    def image_file(self, i: int) -> str:
        return os.path.join(self.image_root, self.images[i])

    def image_captions(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.images]
        for c, i in enumerate(self.caption_image):
            out[i].append(c)
        return out

    def positives(self) -> tuple[list[list[int]], list[list[int]]]:
        """(images of each caption, captions of each image) as scored: captions with the very same
        text are one item (the same embedding). An image's positives are every caption whose text
        is one of its own captions' texts; a caption's positives every image with a caption of its
        text. Without repeated texts: its own image, its own captions."""
        by_text: dict[str, list[int]] = {}
        for c, t in enumerate(self.captions):
            by_text.setdefault(t, []).append(c)
        images_of = {t: sorted({self.caption_image[c] for c in cs}) for t, cs in by_text.items()}
        caption_pos = [images_of[t] for t in self.captions]
        image_pos = [sorted({c2 for c in cs for c2 in by_text[self.captions[c]]}) for cs in self.image_captions()]
        return caption_pos, image_pos

    def check(self, check_images: bool = True) -> "RetrievalSet":
        if not self.images or not self.captions:
            raise ZeroShotDataError(f"{self.name}: no images or no captions read")
        empty = [i for i, c in enumerate(self.image_captions()) if not c]
        if empty:
            raise ZeroShotDataError(f"{self.name}: image {self.images[empty[0]]} has no caption")
        if check_images:
            for i in range(len(self.images)):
                if not os.path.isfile(self.image_file(i)):
                    raise ZeroShotDataError(f"{self.name}: missing image file {self.image_file(i)} "
                                            f"(check image_root, now {self.image_root!r})")
        return self


@dataclass
class ChoiceSet:
    name: str  # e.g. "replace_obj"
    images: list[str] = field(default_factory=list)
    positives: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    image_root: str = ""

    def image_file(self, i: int) -> str:
        return os.path.join(self.image_root, self.images[i])


# ====================================================================== readers
def _add(rs: RetrievalSet, index: dict, image: str, captions: list[str], per_image: int | None) -> None:
    caps = [c.strip() for c in captions if c and c.strip()]
    if per_image:
        caps = caps[:per_image]
    if image not in index:
        index[image] = len(rs.images)
        rs.images.append(image)
    for c in caps:
        rs.captions.append(c)
        rs.caption_image.append(index[image])


def _load_json(path: str | Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_karpathy(path: str, image_root: str, name: str = "", split: str = "test",
                  captions_per_image: int | None = 5) -> RetrievalSet:
    data = _load_json(path)
    if not isinstance(data, dict) or "images" not in data:
        raise ZeroShotDataError(f"{path}: not a Karpathy split file (no 'images' list)")
    rs, index = RetrievalSet(name, image_root=image_root), {}
    for im in data["images"]:
        if split and im.get("split") != split:
            continue
        rel = os.path.join(im.get("filepath") or "", im["filename"])
        _add(rs, index, rel, [s.get("raw", "") for s in im.get("sentences", [])], captions_per_image)
    return rs


def read_lavis(path: str, image_root: str, name: str = "", captions_per_image: int | None = 5) -> RetrievalSet:
    data = _load_json(path)
    if not isinstance(data, list) or (data and not {"image", "caption"} <= set(data[0])):
        raise ZeroShotDataError(f"{path}: not a LAVIS retrieval file (a list of {{image, caption}})")
    rs, index = RetrievalSet(name, image_root=image_root), {}
    for row in data:
        caps = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
        _add(rs, index, row["image"], caps, captions_per_image)
    return rs


def read_sharegpt4v(path: str, image_root: str, name: str = "", limit: int | None = 1000) -> RetrievalSet:
    data = _load_json(path)
    if not isinstance(data, list) or (data and "conversations" not in data[0]):
        raise ZeroShotDataError(f"{path}: not a ShareGPT4V caption file (a list of {{image, conversations}})")
    rs, index = RetrievalSet(name, image_root=image_root), {}
    for row in data[:limit] if limit else data:
        answers = [t.get("value", "") for t in row["conversations"] if t.get("from") in ("gpt", "assistant")]
        if not answers:
            raise ZeroShotDataError(f"{path}: entry for {row.get('image')} has no gpt turn")
        _add(rs, index, row["image"], [answers[0]], 1)
    return rs


def read_urban1k(root: str, name: str = "") -> RetrievalSet:
    img_dir, cap_dir = Path(root) / "image", Path(root) / "caption"
    if not img_dir.is_dir() or not cap_dir.is_dir():
        raise ZeroShotDataError(f"{root}: not an Urban1K folder (expected image/ and caption/)")
    rs, index = RetrievalSet(name, image_root=str(img_dir)), {}
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp"):
            continue
        cap = cap_dir / (p.stem + ".txt")
        if not cap.is_file():
            raise ZeroShotDataError(f"{root}: image {p.name} has no caption file {cap.name}")
        _add(rs, index, p.name, [cap.read_text(encoding="utf-8")], 1)
    return rs


def _check_parts(parts) -> tuple[str, ...]:
    parts = tuple(SUGARCREPE_PARTS if parts is None else parts)
    unknown = [p for p in parts if p not in SUGARCREPE_PARTS]
    if unknown or not parts:
        raise ZeroShotDataError(f"sugarcrepe.parts={list(parts)}: unknown SugarCrepe part(s) {unknown} "
                                f"(expected a non-empty list of {list(SUGARCREPE_PARTS)})")
    return parts


def _missing_parts(where: str, missing: list[str], parts: tuple[str, ...]) -> ZeroShotDataError:
    have = [p for p in parts if p not in missing]
    return ZeroShotDataError(
        f"{where}: missing SugarCrepe part(s) {', '.join(missing)}. The Replace / Swap / Add columns average "
        f"their parts, so a missing one would change them silently. Add the file(s), or run the parts that are "
        f"there on purpose: eval.zeroshot.sets.sugarcrepe.parts=[{','.join(have)}]")


def read_sugarcrepe(root: str, image_root: str, parts=None) -> list[ChoiceSet]:
    """The SugarCrepe parts `parts` (None: all seven); each must be there."""
    parts = _check_parts(parts)
    missing = [f"{part}.json" for part in parts if not (Path(root) / f"{part}.json").is_file()]
    if missing:
        raise _missing_parts(str(root), missing, parts)
    out = []
    for part in parts:
        data = _load_json(Path(root) / f"{part}.json")
        cs = ChoiceSet(part, image_root=image_root)
        for _, row in sorted(data.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else str(kv[0])):
            cs.images.append(row["filename"])
            cs.positives.append(row["caption"])
            cs.negatives.append(row["negative_caption"])
        out.append(cs)
    return out


def _mmeb_rows(path: str, subset: str):
    from rematch_pl.data.mmeb import EVAL_COLUMNS, iter_rows, parse_str_list, stream_subset

    for row in iter_rows(stream_subset(path, subset, "test", EVAL_COLUMNS)):
        yield (row["qry_text"] or "", row["qry_img_path"] or "", parse_str_list(row["tgt_text"], subset),
               parse_str_list(row["tgt_img_path"], subset))


def read_mmeb_retrieval(path: str, name: str, image_root: str | None = None) -> RetrievalSet:
    from rematch_pl.data.mmeb import list_subsets

    prefix = MMEB_NAMES.get(name, name)
    subsets = set(list_subsets(path))
    root = image_root if image_root is not None else path
    rs, index = RetrievalSet(name, image_root=root), {}
    if f"{prefix}_t2i" in subsets:
        for caption, _, _, images in _mmeb_rows(path, f"{prefix}_t2i"):
            for im in images:  # the pool, in order of first appearance
                if im not in index:
                    index[im] = len(rs.images)
                    rs.images.append(im)
            rs.captions.append(caption)
            rs.caption_image.append(index[images[0]])
    elif f"{prefix}_i2t" in subsets:  # only one positive caption per image is known
        for _, image, texts, _ in _mmeb_rows(path, f"{prefix}_i2t"):
            _add(rs, index, image, [texts[0]], 1)
    else:
        raise ZeroShotDataError(f"{path}: no subset {prefix}_t2i or {prefix}_i2t (has {sorted(subsets)})")
    return rs


def read_mmeb_sugarcrepe(path: str, image_root: str | None = None, parts=None) -> list[ChoiceSet]:
    """The ``SugarCrepe_<part>`` subsets of `parts` (None: all seven); each must be there."""
    from rematch_pl.data.mmeb import list_subsets

    parts = _check_parts(parts)
    subsets = set(list_subsets(path))
    missing = [f"SugarCrepe_{part}" for part in parts if f"SugarCrepe_{part}" not in subsets]
    if missing:
        raise _missing_parts(str(path), missing, parts)
    root = image_root if image_root is not None else path
    out = []
    for part in parts:
        cs = ChoiceSet(part, image_root=root)
        for _, image, texts, _ in _mmeb_rows(path, f"SugarCrepe_{part}"):
            if len(texts) != 2:
                raise ZeroShotDataError(f"{path} SugarCrepe_{part}: a row has {len(texts)} captions, expected 2")
            cs.images.append(image)
            cs.positives.append(texts[0])
            cs.negatives.append(texts[1])
        out.append(cs)
    return out


def detect_layout(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        if (p / "image").is_dir() and (p / "caption").is_dir():
            return "urban1k"
        if any((p / f"{part}.json").is_file() for part in SUGARCREPE_PARTS):
            return "sugarcrepe"
        if (p / "README.md").is_file() or any(p.glob("*/*.parquet")):
            return "mmeb"
        raise ZeroShotDataError(f"{path}: cannot tell the layout of this folder; set layout=...")
    if p.suffix == ".json":
        with p.open(encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        if head.startswith("{"):
            return "karpathy"
        return "sharegpt4v" if '"conversations"' in head else "lavis"
    raise ZeroShotDataError(f"{path}: not found, or not a .json file / folder")


def load_set(name: str, path: str, image_root: str | None = None, layout: str = "auto", split: str = "test",
             captions_per_image: int | None = 5, limit: int | None = None, check_images: bool = True,
             parts: list[str] | None = None):
    """One zero-shot set: a `RetrievalSet`, or for SugarCrepe a list of `ChoiceSet` (one per part).

    `parts` (SugarCrepe only): the parts to run (default: all seven, each of which must be there)."""
    if name not in SETS:
        raise ZeroShotDataError(f"unknown zero-shot set {name!r}: expected one of {SETS}")
    if parts is not None and name != "sugarcrepe":
        raise ZeroShotDataError(f"{name}.parts={parts}: parts is only for sugarcrepe")
    if layout not in LAYOUTS:
        raise ZeroShotDataError(f"{name}.layout={layout!r}: expected one of {LAYOUTS}")
    if not os.path.exists(path):
        raise ZeroShotDataError(f"{name}: {path} does not exist")
    layout = detect_layout(path) if layout == "auto" else layout
    root = image_root if image_root is not None else (path if os.path.isdir(path) else os.path.dirname(path))
    if name == "sugarcrepe":
        if layout == "mmeb":
            return read_mmeb_sugarcrepe(path, image_root, parts)
        if layout != "sugarcrepe":
            raise ZeroShotDataError(f"sugarcrepe: layout {layout!r} is not a SugarCrepe layout")
        return read_sugarcrepe(path, root, parts)
    if layout == "karpathy":
        rs = read_karpathy(path, root, name, split, captions_per_image)
    elif layout == "lavis":
        rs = read_lavis(path, root, name, captions_per_image)
    elif layout == "sharegpt4v":
        rs = read_sharegpt4v(path, root, name, limit if limit is not None else 1000)
    elif layout == "urban1k":
        rs = read_urban1k(path, name)
    elif layout == "mmeb":
        rs = read_mmeb_retrieval(path, name, image_root)
    else:
        raise ZeroShotDataError(f"{name}: layout {layout!r} is not a retrieval layout")
    if limit and layout != "sharegpt4v":
        keep = set(range(min(limit, len(rs.images))))
        caps = [(c, i) for c, i in zip(rs.captions, rs.caption_image) if i in keep]
        rs = RetrievalSet(rs.name, rs.images[: len(keep)], [c for c, _ in caps], [i for _, i in caps], rs.image_root)
    return rs.check(check_images)


# ====================================================================== conversion
def to_mmeb_layout(sets: dict, out_dir: str | Path, directions=("t2i", "i2t")) -> Path:
    """Write loaded sets ({name: RetrievalSet | [ChoiceSet]}) in the MMEB-eval layout (see module docstring).

    Image paths are written as the sets name them; use the sets' image roots as `image_root` when
    reading back.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    configs = []

    def write(subset: str, cols: dict) -> None:
        (out / subset).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), out / subset / "test-00000-of-00001.parquet")
        configs.append(subset)

    for name, data in sets.items():
        prefix = MMEB_NAMES[name]
        if isinstance(data, RetrievalSet):
            n = len(data.images)
            caps = data.image_captions()
            t2i = {"qry_text": [], "qry_img_path": [], "tgt_text": [], "tgt_img_path": []}
            for c, i in zip(data.captions, data.caption_image):
                t2i["qry_text"].append(c)
                t2i["qry_img_path"].append("")
                t2i["tgt_text"].append(["<|image_1|>"] * n)
                t2i["tgt_img_path"].append([data.images[i]] + [data.images[j] for j in range(n) if j != i])
            if "t2i" in directions:
                write(f"{prefix}_t2i", t2i)
            i2t = {"qry_text": [], "qry_img_path": [], "tgt_text": [], "tgt_img_path": []}
            for i in range(n):
                first = caps[i][0]
                order = [first] + [c for c in range(len(data.captions)) if c != first]
                i2t["qry_text"].append("<|image_1|>")
                i2t["qry_img_path"].append(data.images[i])
                i2t["tgt_text"].append([data.captions[c] for c in order])
                i2t["tgt_img_path"].append([""] * len(order))
            if "i2t" in directions:
                write(f"{prefix}_i2t", i2t)
        else:
            for cs in data:
                write(f"SugarCrepe_{cs.name}", {
                    "qry_text": ["<|image_1|>"] * len(cs.images), "qry_img_path": list(cs.images),
                    "tgt_text": [[p, n] for p, n in zip(cs.positives, cs.negatives)],
                    "tgt_img_path": [["", ""] for _ in cs.images]})
    lines = ["---", "configs:"]
    for s in configs:
        lines += [f"- config_name: {s}", "  data_files:", "  - split: test", f"    path: {s}/test-*"]
    (out / "README.md").write_text("\n".join(lines + ["---", "# Zero-shot sets in the MMEB-eval layout", ""]))
    return out


# ====================================================================== synthetic stand-ins
def _long_caption(k: int, colour: str, shape: str, rng: random.Random) -> str:
    from rematch_pl.data.synthetic import caption

    bg = rng.choice(["light gray", "pale gray", "white"])
    return (f"The picture shows {caption(k, colour, shape)} on a {bg} background. Each {shape} is filled with a "
            f"flat {colour} colour and has sharp edges. There is no text and nothing else in the scene, "
            f"so the image contains exactly {caption(k, colour, shape)}.")


def write_synthetic_zeroshot(out_dir: str | os.PathLike, seed: int = 0, n_images: int = 24, image_size: int = 64,
                             mmeb: bool = True) -> Path:
    """Write the five zero-shot sets, drawn with the synthetic shapes, in their public layouts
    (Flickr30K: Karpathy JSON, COCO: LAVIS JSON, ShareGPT4V: conversations JSON, Urban1K: image/ +
    caption/, SugarCrepe: per-part JSON) and, with `mmeb`, converted to the MMEB-eval layout under
    ``mmeb/``. Idempotent (a complete folder is reused). Returns `out_dir`.
    """
    from rematch_pl.data.synthetic import _all_concepts

    from .folders import build_once

    if n_images > len(_all_concepts()):
        raise ValueError(f"n_images <= {len(_all_concepts())} (one scene per concept)")
    params = {"seed": seed, "n_images": n_images, "image_size": image_size, "mmeb": mmeb, "version": 1}
    return build_once(out_dir, "zeroshot.json", params,
                      lambda out: _write_zeroshot(out, seed, n_images, image_size, mmeb), ZeroShotDataError)


def _write_zeroshot(out: Path, seed: int, n_images: int, image_size: int, mmeb: bool) -> None:
    from rematch_pl.data.synthetic import (COLOURS, SHAPES, _all_concepts, _concept_image, caption, cell_scene)

    rng = random.Random(f"{seed}|zeroshot")
    concepts = _all_concepts()

    def scenes(sub: str):
        (out / sub).mkdir(parents=True, exist_ok=True)
        chosen = rng.sample(concepts, n_images)
        files = []
        for j, con in enumerate(chosen):
            rel = f"{j:04d}.png"
            _concept_image(rng, image_size, con).save(out / sub / rel)
            files.append(rel)
        return chosen, files

    def short_caps(con):
        c = caption(*con)
        return [c, f"a picture of {c}", f"there are {c}", f"an image with {c}", f"{c} on a gray background"]

    # Flickr30K: Karpathy split JSON
    chosen, files = scenes("flickr30k/flickr30k-images")
    images = [{"filename": f, "split": "test", "sentences": [{"raw": c} for c in short_caps(con)]}
              for con, f in zip(chosen, files)]
    images.append({"filename": "unused.png", "split": "train", "sentences": [{"raw": "not in the test split"}]})
    (out / "flickr30k" / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    # COCO: LAVIS JSON (6 captions, the 6th beyond captions_per_image)
    chosen, files = scenes("coco/val2014")
    rows = [{"image": f"val2014/{f}", "caption": short_caps(con) + ["one more caption"]}
            for con, f in zip(chosen, files)]
    (out / "coco" / "coco_karpathy_test.json").write_text(json.dumps(rows))
    # ShareGPT4V: conversations JSON
    chosen, files = scenes("sharegpt4v/images")
    rows = [{"id": str(j), "image": f"images/{f}", "conversations": [
        {"from": "human", "value": "<image>\nDescribe this image in detail."},
        {"from": "gpt", "value": _long_caption(*con, rng)}]} for j, (con, f) in enumerate(zip(chosen, files))]
    (out / "sharegpt4v" / "share-captioner_coco_lcs_sam_1246k_1107.json").write_text(json.dumps(rows))
    # Urban1K: image/ + caption/
    chosen, files = scenes("Urban1k/image")
    (out / "Urban1k" / "caption").mkdir(parents=True, exist_ok=True)
    for con, f in zip(chosen, files):
        (out / "Urban1k" / "caption" / (Path(f).stem + ".txt")).write_text(_long_caption(*con, rng))
    # SugarCrepe: per-part JSON, images in a COCO-like folder
    (out / "sugarcrepe" / "val2017").mkdir(parents=True, exist_ok=True)
    colours, shapes = list(COLOURS), list(SHAPES)
    n = 0
    for part in SUGARCREPE_PARTS:
        data = {}
        for j in range(max(4, n_images // 4)):
            c1, c2 = rng.sample(colours, 2)
            s1, s2 = rng.sample(shapes, 2)
            if part.startswith("swap"):
                img, _ = cell_scene(rng, image_size, [(c1, s1), (c2, s2)])
                pos = f"a {c1} {s1} and a {c2} {s2}"
                neg = f"a {c2} {s1} and a {c1} {s2}" if part == "swap_att" else f"a {c1} {s2} and a {c2} {s1}"
            elif part.startswith("add"):
                img, _ = cell_scene(rng, image_size, [(c1, s1)])
                pos = f"a {c1} {s1}"
                neg = f"a {c1} {s1} and a {c2} {s2}" if part == "add_obj" else f"a {c1} {s1} with {c2} edges"
            else:
                img, _ = cell_scene(rng, image_size, [(c1, s1)])
                pos = f"a {c1} {s1}"
                neg = {"replace_obj": f"a {c1} {s2}", "replace_att": f"a {c2} {s1}",
                       "replace_rel": f"a {c1} {s1} below a line"}[part]
            fname = f"{n:012d}.png"
            n += 1
            img.save(out / "sugarcrepe" / "val2017" / fname)
            data[str(j)] = {"filename": fname, "caption": pos, "negative_caption": neg}
        (out / "sugarcrepe" / f"{part}.json").write_text(json.dumps(data))
    if mmeb:
        sets = {name: load_set(name, **path_args) for name, path_args in synthetic_paths(out).items()}
        to_mmeb_layout(sets, out / "mmeb")


def synthetic_paths(root: str | os.PathLike, layout: str = "public") -> dict[str, dict]:
    """{set: {path, image_root, layout}} of the synthetic sets in `root` (public layouts or ``mmeb``)."""
    r = Path(root)
    if layout == "mmeb":
        roots = {"flickr30k": r / "flickr30k" / "flickr30k-images", "coco": r / "coco", "sharegpt4v": r / "sharegpt4v",
                 "urban1k": r / "Urban1k" / "image", "sugarcrepe": r / "sugarcrepe" / "val2017"}
        return {n: {"path": str(r / "mmeb"), "image_root": str(roots[n]), "layout": "mmeb"} for n in SETS}
    return {
        "flickr30k": {"path": str(r / "flickr30k" / "dataset_flickr30k.json"),
                      "image_root": str(r / "flickr30k" / "flickr30k-images"), "layout": "karpathy"},
        "coco": {"path": str(r / "coco" / "coco_karpathy_test.json"), "image_root": str(r / "coco"), "layout": "lavis"},
        "sharegpt4v": {"path": str(r / "sharegpt4v" / "share-captioner_coco_lcs_sam_1246k_1107.json"),
                       "image_root": str(r / "sharegpt4v"), "layout": "sharegpt4v"},
        "urban1k": {"path": str(r / "Urban1k"), "image_root": None, "layout": "urban1k"},
        "sugarcrepe": {"path": str(r / "sugarcrepe"), "image_root": str(r / "sugarcrepe" / "val2017"),
                       "layout": "sugarcrepe"},
    }
