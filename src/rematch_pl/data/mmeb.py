"""Readers for the MMEB datasets (see shared/notes/mmeb-formats.md for the formats).

* MMEB-train (``TIGER-Lab/MMEB-train`` or a local clone): one config per subset, rows
  ``qry, qry_image_path, pos_text, pos_image_path, neg_text, neg_image_path`` (plain
  strings, empty string = absent), image paths relative to an image root.
* Hard negatives in the mmE5 layout (``intfloat/mmE5-MMEB-hardneg``): the same columns,
  but ``neg_text`` / ``neg_image_path`` hold *stringified Python lists*; joined to the
  training rows by ``(qry, qry_image_path, pos_text, pos_image_path)``.
* MMEB-eval (``TIGER-Lab/MMEB-eval``, split ``test``): ``qry_text, qry_img_path,
  tgt_text (list), tgt_img_path (list)``, the positive at index 0 of each list.

A local clone is a folder ``<path>/<subset>/<split>-*.parquet`` (with the dataset card
``<path>/README.md`` listing the configs); anything else is taken as a hub id. Both are
read with HF ``datasets`` in streaming mode. This module also holds the content rules
shared by training and evaluation (placeholder checks, target instructions).
"""

from __future__ import annotations

import ast
import contextlib
import glob
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from rematch_pl.backbone.processor import MMEB_IMAGE_PLACEHOLDER, VISION_BLOCK

TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
IMAGE_PLACEHOLDER = MMEB_IMAGE_PLACEHOLDER


class DataError(ValueError):
    """A dataset, subset, row or file that cannot be used; the message says where and what to do."""


# ====================================================================== sources
def is_local(path: str | os.PathLike) -> bool:
    """A local clone (a folder) rather than a hub id."""
    return os.path.isdir(path)


def _card_configs(path: str) -> list[str]:
    """Config names from the YAML front matter of ``<path>/README.md`` ([] when absent)."""
    readme = os.path.join(path, "README.md")
    if not os.path.isfile(readme):
        return []
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, flags=re.S)
    if not match:
        return []
    import yaml

    try:
        card = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as e:
        raise DataError(f"{readme}: the dataset-card YAML front matter does not parse: {e}") from e
    configs = card.get("configs") if isinstance(card, dict) else None
    return [c["config_name"] for c in configs or [] if isinstance(c, dict) and "config_name" in c]


def list_subsets(path: str | os.PathLike) -> list[str]:
    """Subset (config) names: the dataset card's configs, else the sub-folders holding parquet files."""
    path = os.fspath(path)
    if is_local(path):
        names = _card_configs(path) or sorted(
            d for d in os.listdir(path) if glob.glob(os.path.join(glob.escape(path), glob.escape(d), "*.parquet")))
        if not names:
            raise DataError(f"dataset {path!r}: no subsets (no configs in a README.md card, no sub-folder holding "
                            "parquet files). Is this the dataset's top folder, <path>/<Subset>/<split>-*.parquet?")
        return names
    _not_a_missing_folder(path)
    _hub_or_fail(path)
    from datasets import get_dataset_config_names

    try:
        return list(get_dataset_config_names(path))
    except (ConnectionError, OSError) as e:
        raise _unreachable(path, e) from e


DATA_PATH_KEYS = "data.train.path, data.hardneg.path, data.eval.path, eval.mmeb.path"


def _not_a_missing_folder(path: str) -> None:
    """A path that is not a folder and reads as one (not as a hub id) fails here, by name."""
    if path.startswith(("/", ".", "~")):
        raise DataError(f"dataset {path!r}: no such folder ({os.path.abspath(os.path.expanduser(path))}). "
                        f"Set the dataset's path ({DATA_PATH_KEYS}) to a local clone or a hub id.")


def image_root_problem(section: str, path: str, image_root: str | None) -> str | None:
    """Why `image_root` cannot serve the dataset at `path` (None: it can), naming the settings
    ``<section>.image_root`` and ``<section>.path`` (e.g. section ``data.train``). A hub id holds no images (MMEB's come as archives, unpacked
    under the image root); without an image root a local clone serves its own relative paths."""
    key = f"{section}.image_root"
    if image_root is None:
        if os.path.isdir(os.fspath(path)):
            return None
        return (f"{key} is not set and {section}.path={os.fspath(path)!r} is a hub id, which holds no images: "
                f"unpack the dataset's image archives and set {key} to the folder the relative image paths start from")
    if not os.path.isdir(os.path.expanduser(os.fspath(image_root))):
        return (f"{key}={os.fspath(image_root)!r}: no such folder (the folder the dataset's relative image paths, "
                "e.g. images/<Subset>/..., are joined to)")
    return None


def _hub_or_fail(path: str) -> None:
    """A hub id while the probe found no hub (`rematch_pl.hub`): fail now, not after the client's retries."""
    from ..hub import endpoint, hub_reachable

    if not hub_reachable():
        raise _unreachable(path, f"the hub ({endpoint()}) cannot be reached from this machine")


def _unreachable(path: str, cause: Exception | str) -> DataError:
    return DataError(
        f"dataset {path!r} (a hub id: no local folder of that name) could not be reached: {cause}. "
        f"On an offline machine clone it elsewhere (`hf download {path} --repo-type dataset --local-dir DIR`), "
        f"copy DIR over and set the dataset's path ({DATA_PATH_KEYS}) to it.")


def subset_files(path: str, subset: str, split: str) -> list[str]:
    """Parquet files of one split of one subset of a local clone, in order."""
    return sorted(glob.glob(os.path.join(glob.escape(os.fspath(path)), glob.escape(subset), f"{split}-*.parquet")))


def _local_splits(path: str, subset: str) -> list[str]:
    files = glob.glob(os.path.join(glob.escape(path), glob.escape(subset), "*.parquet"))
    return sorted({os.path.basename(f).split("-")[0] for f in files})


def _missing_subset_error(path: str, subset: str, split: str, cause: Exception | None = None) -> DataError:
    try:
        available = list_subsets(path)
    except Exception as e:  # the listing itself failed (hub unreachable, ...)
        available = f"<could not list: {e}>"
    msg = f"dataset {path!r}: no subset {subset!r} with split {split!r}. Available subsets: {available}"
    if is_local(path) and subset in (available if isinstance(available, list) else []):
        msg += f"; splits of {subset!r}: {_local_splits(path, subset)}"
    if cause is not None:
        msg += f" ({type(cause).__name__}: {cause})"
    return DataError(msg + ". Check the subset name and split in the data config.")


@contextlib.contextmanager
def _no_download_count():
    """``load_dataset("parquet", ...)`` pings the hub to count a "download" of the packaged
    parquet module, even for local files; without network each ping waits for its timeout
    (seconds, per call). A local read has nothing to count: switch the ping off meanwhile."""
    import datasets.config

    old = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = old


def stream_subset(path: str | os.PathLike, subset: str, split: str, columns=TRAIN_COLUMNS):
    """A streaming HF ``datasets.IterableDataset`` over one subset/split, with `columns` checked.

    Iterate it with `iter_rows` (not ``for row in ds``: inside a DataLoader worker,
    ``datasets`` would silently keep only that worker's share of the files).
    """
    import datasets

    path = os.fspath(path)
    if is_local(path):
        files = subset_files(path, subset, split)
        if not files:
            raise _missing_subset_error(path, subset, split)
        with _no_download_count():
            ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    else:
        _not_a_missing_folder(path)
        _hub_or_fail(path)
        try:
            ds = datasets.load_dataset(path, subset, split=split, streaming=True)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise _missing_subset_error(path, subset, split, e) from e
        except (ConnectionError, OSError) as e:
            raise _unreachable(path, e) from e
    names = ds.column_names
    if names is None:  # features unknown until the first row is read
        first = next(iter(ds.take(1)), None)
        names = list(first) if first is not None else []
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(
            f"dataset {path!r} subset {subset!r} split {split!r}: missing column(s) {missing}; "
            f"it has {list(names)}. Is this the right dataset for this reader (expected {list(columns)})?"
        )
    return ds


def iter_rows(ds, batch_size: int = 256) -> Iterator[dict]:
    """All rows of a streamed dataset in file order, also inside DataLoader workers."""
    for batch in ds.iter(batch_size=batch_size):
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        for i in range(n):
            yield {k: batch[k][i] for k in keys}


@lru_cache(maxsize=256)
def _file_row_counts(path: str, subset: str, split: str) -> tuple[tuple[str, int], ...]:
    import pyarrow.parquet as pq

    return tuple((f, pq.ParquetFile(f).metadata.num_rows) for f in subset_files(path, subset, split))


def count_rows(path: str | os.PathLike, subset: str, split: str) -> int | None:
    """Rows of a subset/split (None when unknown, e.g. a hub dataset without split sizes)."""
    path = os.fspath(path)
    if is_local(path):
        counts = _file_row_counts(path, subset, split)
        if not counts:
            raise _missing_subset_error(path, subset, split)
        return sum(n for _, n in counts)
    try:
        import datasets

        info = datasets.load_dataset_builder(path, subset).info
        return int(info.splits[split].num_examples) if info.splits and split in info.splits else None
    except Exception:
        return None


def row_file(path: str | os.PathLike, subset: str, split: str, row_index: int) -> str:
    """The file that holds row `row_index` of a subset (for error messages)."""
    path = os.fspath(path)
    if is_local(path):
        start = 0
        for f, n in _file_row_counts(path, subset, split):
            if row_index < start + n:
                return f"{f} (row {row_index - start} of that file)"
            start += n
    return f"{path} [{subset}/{split}]"


# ====================================================================== contents
def count_placeholders(text: str) -> int:
    return text.count(IMAGE_PLACEHOLDER) + text.count(VISION_BLOCK)


def normalize_content(text: str | None, has_image: bool) -> str:
    """An image with no text at all becomes the bare placeholder (an image-only content)."""
    text = text or ""
    if has_image and not text.strip():
        return IMAGE_PLACEHOLDER
    return text


def content_problem(text: str, has_image: bool) -> str | None:
    """None when (text, image) is a usable content, else 'empty' or a placeholder-mismatch description."""
    n = count_placeholders(text)
    if not has_image and not text.strip():
        return "empty"
    if has_image and n != 1:
        return f"text has {n} image placeholder(s) for 1 image"
    if not has_image and n:
        return f"text has {n} image placeholder(s) but no image path"
    return None


# ====================================================================== hard negatives
def parse_str_list(value, what: str = "value") -> list[str]:
    """A stringified Python list of strings (mmE5 layout) -> list[str], safely.

    Accepts a real list too, and ``""``/None as the empty list; None elements read as
    ``""``. Anything else (code, dicts, numbers) is a DataError: only literals are
    parsed (``ast.literal_eval``), never evaluated.
    """
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str):
        s = value.strip()
        if not s:
            return []
        try:
            items = ast.literal_eval(s)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
            raise DataError(f"{what}: not a list literal: {value[:120]!r} ({type(e).__name__})") from e
        if not isinstance(items, list):
            raise DataError(f"{what}: expected a list of strings, got {type(items).__name__}: {value[:120]!r}")
    else:
        raise DataError(f"{what}: expected a list of strings, got {type(value).__name__}")
    out = []
    for x in items:
        if x is None:
            out.append("")
        elif isinstance(x, str):
            out.append(x)
        else:
            raise DataError(f"{what}: element {x!r} is not a string")
    return out


def row_key(row: Mapping) -> tuple[str, str, str, str]:
    """The join key of a training row and its hard-negative row."""
    return (row.get("qry") or "", row.get("qry_image_path") or "", row.get("pos_text") or "",
            row.get("pos_image_path") or "")


def _negative_pairs(texts: list[str], paths: list[str], what: str) -> list[tuple[str, str]]:
    if not paths:
        paths = [""] * len(texts)
    if not texts:
        texts = [""] * len(paths)
    if len(texts) != len(paths):
        raise DataError(f"{what}: neg_text has {len(texts)} entries but neg_image_path has {len(paths)}")
    return list(zip(texts, paths))


class HardNegativeIndex:
    """Hard negatives of one subset, keyed by `row_key`.

    Each entry is the ordered list of ``(text, image_path)`` negatives (image paths as
    stored, relative to ``image_root``). On duplicate keys the first row wins
    (``duplicates`` counts the others). A malformed row (a list that does not parse, text and
    image lists of different lengths) does not stop the loading: its training row gets the
    DataError from `get` (the stream's ``on_bad_row`` decides), ``malformed`` counts them.
    """

    def __init__(self, entries: dict, image_root: str | None = None, source: str = ""):
        self.entries = entries
        self.image_root = image_root
        self.source = source
        self.duplicates = 0
        self.malformed = 0

    @classmethod
    def from_rows(cls, rows, image_root: str | None = None, source: str = "") -> "HardNegativeIndex":
        index = cls({}, image_root, source)
        for i, row in enumerate(rows):
            what = f"{source} row {i}"
            key = row_key(row)
            if key in index.entries:
                index.duplicates += 1
                continue
            try:
                texts = parse_str_list(row.get("neg_text"), f"{what} neg_text")
                paths = parse_str_list(row.get("neg_image_path"), f"{what} neg_image_path")
                index.entries[key] = _negative_pairs(texts, paths, what)
            except DataError as e:
                index.entries[key] = e
                index.malformed += 1
        return index

    @classmethod
    def load(cls, path: str | os.PathLike, subset: str, split: str = "original",
             image_root: str | None = None) -> "HardNegativeIndex":
        path = os.fspath(path)
        ds = stream_subset(path, subset, split, TRAIN_COLUMNS)
        return cls.from_rows(iter_rows(ds), image_root, f"hard negatives {path} [{subset}/{split}]")

    def get(self, row: Mapping) -> list[tuple[str, str]] | None:
        """The negatives of a training row (None when the row has no entry); raises the DataError
        of a malformed entry."""
        found = self.entries.get(row_key(row))
        if isinstance(found, DataError):
            raise DataError(str(found))
        return found

    def __len__(self) -> int:
        return len(self.entries)


def in_row_negatives(row: Mapping, what: str = "row") -> list[tuple[str, str]]:
    """Negatives held by a training row itself: one plain string, or stringified lists."""
    text, path = row.get("neg_text") or "", row.get("neg_image_path") or ""
    if path.lstrip().startswith("["):  # image paths never start with '[': a list
        return _negative_pairs(parse_str_list(text, what), parse_str_list(path, what), what)
    if text.lstrip().startswith("["):
        try:
            texts = parse_str_list(text, what)
        except DataError:  # a plain negative text that starts with '['
            texts = None
        if texts is not None:
            return _negative_pairs(texts, [path] if path else [], what)
    return [(text, path)] if (text.strip() or path) else []


def select_negatives(negatives: list[tuple[str, str]], n: int,
                     positive: tuple[str, str] | None = None) -> list[tuple[str, str]]:
    """The first `n` usable negatives.

    A negative with an empty text and no image is skipped, i.e. replaced by the next
    non-empty one (as upstream); so is one identical to the positive (a positive used
    as its own negative silently breaks the loss).
    """
    usable = [(t or "", p or "") for t, p in negatives if (t or "").strip() or p]
    if positive is not None:
        usable = [c for c in usable if c != positive]
    return usable[:n]


# ====================================================================== target instructions
# Document-side ("target") instructions per subset. Image documents of MMEB-train
# already carry one (e.g. "<|image_1|>\nRepresent the given image."): an instruction
# that the text already contains is not added twice.
_IMAGE = "Represent the given image."
_CROP = "Represent the given cropped image of the object."
_LABEL = "Represent the class label: "
_ANSWER = "Represent the answer: "
DEFAULT_TARGET_INSTRUCTIONS: dict[str, str] = {
    # classification: text labels
    **{s: _LABEL for s in ("ImageNet_1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365",
                           "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211")},
    # VQA: text answers
    **{s: _ANSWER for s in ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
                            "ScienceQA", "VizWiz", "GQA", "TextVQA")},
    # retrieval
    "VisDial": _IMAGE, "CIRR": _IMAGE, "VisualNews_t2i": _IMAGE, "MSCOCO_t2i": _IMAGE, "NIGHTS": _IMAGE,
    "FashionIQ": _IMAGE,
    "VisualNews_i2t": "Represent the news caption: ", "MSCOCO_i2t": "Represent the caption: ",
    "WebQA": "Represent the given image with related text information: ",
    "EDIS": "Represent the given image with related text information: ",
    "OVEN": "Represent the given Wikipedia image with related text information: ",
    "Wiki-SS-NQ": "Represent the given Wikipedia page screenshot: ",
    # visual grounding: image crops
    "MSCOCO": _CROP, "RefCOCO": _CROP, "RefCOCO-Matching": _CROP, "Visual7W-Pointing": _CROP,
    # the synthetic subsets (data.synthetic)
    "Syn_CLS": _LABEL, "Syn_VQA": _ANSWER, "Syn_T2I": _IMAGE, "Syn_I2T": "Represent the caption: ",
    "Syn_VG": _CROP,
}


def _norm_name(name: str) -> str:
    """Subset names compare ignoring case and punctuation ('ImageNet-1K' == 'ImageNet_1K')."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def resolve_target_instructions(config) -> dict | None:
    """None/False -> off; True or 'default' -> DEFAULT_TARGET_INSTRUCTIONS; a mapping -> itself.

    A mapping maps a subset name (or ``"default"`` for the others) to an instruction
    string, or to ``{"image": ..., "text": ...}`` to tell image and text documents apart.
    A given mapping replaces the defaults (it is not merged with them).
    """
    if config is None or config is False:
        return None
    if config is True or config == "default":
        return dict(DEFAULT_TARGET_INSTRUCTIONS)
    if isinstance(config, Mapping):
        return {str(k): v for k, v in config.items()}
    raise DataError(f"target_instruction must be None, 'default' or a mapping subset -> instruction, "
                    f"got {type(config).__name__}: {config!r}")


def target_instruction_for(table: Mapping | None, subset: str, has_image: bool) -> str | None:
    """The instruction of a document of `subset` (None: leave the text as it is)."""
    if not table:
        return None
    normed = {_norm_name(k): v for k, v in table.items()}
    value = normed.get(_norm_name(subset), normed.get("default"))
    if isinstance(value, Mapping):
        value = value.get("image" if has_image else "text")
    return value or None


def apply_target_instruction(text: str, has_image: bool, instruction: str | None) -> str:
    """Document text with its instruction in front; an image placeholder stays at the very front.

    ``"red circle"`` -> ``"Represent the class label: red circle"``;
    ``"<|image_1|>"`` -> ``"<|image_1|>\\nRepresent the given image."``. A text that already
    contains the instruction is returned unchanged; the comparison ignores the instruction's final
    punctuation and whitespace (MMEB's visual-grounding documents end "...of the object", the
    default instruction "...of the object."), and the words must end there (not go on with more
    words on the same line: "Represent the given image with related text" does not contain
    "Represent the given image.").
    """
    if not instruction:
        return text
    core = re.sub(r"[\W_]+$", "", instruction.strip())
    if re.search(re.escape(core) + r"(?![^\S\n]*\w)", text) if core else instruction.strip() in text:
        return text
    if has_image:
        mark = VISION_BLOCK if VISION_BLOCK in text else IMAGE_PLACEHOLDER
        rest = text.replace(mark, "", 1).strip()
        return mark + "\n" + _join(instruction, rest)
    return _join(instruction, text.strip())


def _join(instruction: str, rest: str) -> str:
    return instruction.rstrip() + (" " + rest if rest else "")


# ====================================================================== evaluation
@dataclass
class EvalSet:
    """One MMEB-eval subset as a deduplicated item table.

    ``items[k] = (text, image_path)`` is each unique (text, image) pair once (image path
    relative to ``image_root``, ``""`` = no image); ``queries[q]`` is the item of query q
    and ``candidates[q]`` its candidate items, the positive first.
    """

    subset: str
    items: list[tuple[str, str]] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)
    candidates: list[list[int]] = field(default_factory=list)
    image_root: str = ""

    def image_file(self, item: int) -> str | None:
        path = self.items[item][1]
        return os.path.join(self.image_root, path) if path else None

    @property
    def num_queries(self) -> int:
        return len(self.queries)


def load_eval_subset(path: str | os.PathLike, image_root: str | os.PathLike | None, subset: str,
                     max_queries: int | None = None, split: str = "test", target_instruction=None,
                     check_images: bool = True) -> EvalSet:
    """Read one MMEB-eval subset (the first `max_queries` queries) into an `EvalSet`.

    Candidate texts get the target instruction when one is configured (as at training).
    Evaluation has no skip policy: a bad query, candidate or missing image file is a
    DataError naming the subset, row and file, since dropping it would change the score.
    """
    path = os.fspath(path)
    image_root = os.fspath(image_root) if image_root is not None else (path if is_local(path) else "")
    table = resolve_target_instructions(target_instruction)
    ds = stream_subset(path, subset, split, EVAL_COLUMNS)
    out = EvalSet(subset=subset, image_root=image_root)
    index: dict[tuple[str, str], int] = {}
    first_row: list[int] = []

    def item(text: str, image: str, row: int, role: str, document: bool) -> int:
        has_image = bool(image)
        text = normalize_content(text, has_image)
        problem = content_problem(text, has_image)
        if problem:
            raise DataError(f"eval subset {subset!r} row {row} ({role}): {problem} "
                            f"(file {row_file(path, subset, split, row)}); fix the data or leave the subset out")
        if document:
            text = apply_target_instruction(text, has_image, target_instruction_for(table, subset, has_image))
        key = (text, image)
        if key not in index:
            index[key] = len(out.items)
            out.items.append(key)
            first_row.append(row)
        return index[key]

    for row_i, row in enumerate(iter_rows(ds)):
        if max_queries is not None and row_i >= max_queries:
            break
        texts = parse_str_list(row["tgt_text"], f"eval subset {subset!r} row {row_i} tgt_text")
        images = parse_str_list(row["tgt_img_path"], f"eval subset {subset!r} row {row_i} tgt_img_path")
        pairs = _negative_pairs(texts, images, f"eval subset {subset!r} row {row_i}")
        if not pairs:
            raise DataError(f"eval subset {subset!r} row {row_i}: no candidates (file "
                            f"{row_file(path, subset, split, row_i)})")
        out.queries.append(item(row["qry_text"] or "", row["qry_img_path"] or "", row_i, "query", False))
        out.candidates.append([item(t, p, row_i, f"candidate {j}", True) for j, (t, p) in enumerate(pairs)])
    if not out.queries:
        raise DataError(f"eval subset {subset!r} of {path!r} split {split!r} has no rows")
    if check_images:
        for k, (_, image) in enumerate(out.items):
            if image and not os.path.isfile(os.path.join(image_root, image)):
                raise DataError(f"eval subset {subset!r} row {first_row[k]}: missing image file "
                                f"{os.path.join(image_root, image)}; check eval.image_root (now {image_root!r})")
    return out
