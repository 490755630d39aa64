"""The paper's result tables: Table 1 (MMEB) and Table 2 (zero-shot), as rows, markdown and JSON.

Table 1 columns: per meta-task mean Hit@1 (CLS, VQA, RET, VG), the IND mean (the 20 training
tasks), the OOD mean (the other 16) and the Overall mean over every evaluated subset, in percent.
A column whose subsets were not evaluated is left empty. The synthetic subsets of the embedded
default map to CLS / VQA / RET / RET / VG and count as IND (they are trained on).

Table 2 columns: Flickr30K, COCO, ShareGPT4V, Urban1K (text->image and image->text Recall@1),
SugarCrepe (Replace / Swap / Add accuracy).
"""

from __future__ import annotations

import re

_MMEB = {
    "CLS": (("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"),
            ("Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211")),
    "VQA": (("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W"),
            ("ScienceQA", "VizWiz", "GQA", "TextVQA")),
    "RET": (("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA"),
            ("FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS")),
    "VG": (("MSCOCO",), ("RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing")),
}
SYNTHETIC = {"Syn_CLS": "CLS", "Syn_VQA": "VQA", "Syn_T2I": "RET", "Syn_I2T": "RET", "Syn_VG": "VG"}
META_TASKS = ("CLS", "VQA", "RET", "VG")
TABLE1_COLUMNS = ("CLS", "VQA", "RET", "VG", "IND", "OOD", "Overall")


def norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


SUBSET_INFO: dict[str, tuple[str, str]] = {}  # normalised name -> (meta-task, IND | OOD)
for _task, (_ind, _ood) in _MMEB.items():
    SUBSET_INFO.update({norm(s): (_task, "IND") for s in _ind})
    SUBSET_INFO.update({norm(s): (_task, "OOD") for s in _ood})
SUBSET_INFO.update({norm(s): (t, "IND") for s, t in SYNTHETIC.items()})
MMEB_SUBSETS = tuple(s for ind, ood in _MMEB.values() for s in ind + ood)  # the 36, by meta-task


def subset_info(name: str, extra: dict | None = None) -> tuple[str | None, str | None]:
    """(meta-task, IND/OOD) of a subset name (case and punctuation ignored); (None, None) if unknown."""
    if extra:
        for k, v in extra.items():
            if norm(k) == norm(name):
                return tuple(v) if isinstance(v, (list, tuple)) else (v, None)
    return SUBSET_INFO.get(norm(name), (None, None))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def table1(hit1: dict[str, float], extra: dict | None = None) -> dict:
    """Per-subset Hit@1 (fractions) -> Table 1 row in percent: {CLS, VQA, RET, VG, IND, OOD, Overall, n}."""
    by_task = {t: [] for t in META_TASKS}
    split = {"IND": [], "OOD": []}
    for name, v in hit1.items():
        task, where = subset_info(name, extra)
        if task in by_task:
            by_task[task].append(v)
        if where in split:
            split[where].append(v)
    row = {t: _mean(by_task[t]) for t in META_TASKS}
    row.update(IND=_mean(split["IND"]), OOD=_mean(split["OOD"]), Overall=_mean(list(hit1.values())))
    row = {k: (None if v is None else round(100.0 * v, 2)) for k, v in row.items()}
    row["subsets"] = len(hit1)
    return row


TABLE2_COLUMNS = (
    ("flickr30k", "t2i", "Flickr30K t->i"), ("flickr30k", "i2t", "Flickr30K i->t"),
    ("coco", "t2i", "COCO t->i"), ("coco", "i2t", "COCO i->t"),
    ("sharegpt4v", "t2i", "ShareGPT4V t->i"), ("sharegpt4v", "i2t", "ShareGPT4V i->t"),
    ("urban1k", "t2i", "Urban1K t->i"), ("urban1k", "i2t", "Urban1K i->t"),
    ("sugarcrepe", "replace", "SugarCrepe Replace"), ("sugarcrepe", "swap", "SugarCrepe Swap"),
    ("sugarcrepe", "add", "SugarCrepe Add"),
)


def table2(results: dict[str, dict]) -> dict:
    """Zero-shot results {set: {t2i: {R@1..}, i2t: {..}} | {replace: acc, ...}} -> Table 2 row (percent)."""
    row = {}
    for name, key, col in TABLE2_COLUMNS:
        r = results.get(name, {}).get(key)
        if isinstance(r, dict):
            r = r.get("R@1")
        row[col] = None if r is None else round(float(r), 2)
    return row


def _fmt(v) -> str:
    return "" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))


def markdown(rows: list[tuple[str, dict]], columns: list[str], title: str = "") -> str:
    """A markdown table: one line per (model name, row)."""
    head = "| Model | " + " | ".join(columns) + " |"
    sep = "|---|" + "|".join("---:" for _ in columns) + "|"
    lines = ([f"**{title}**", ""] if title else []) + [head, sep]
    for name, row in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def per_subset_markdown(results: dict[str, dict], extra: dict | None = None) -> str:
    """One line per MMEB subset: meta-task, IND/OOD, Hit@1/Hit@5/MRR (percent), chance, queries."""
    lines = ["| Subset | Task | Split | Hit@1 | Hit@5 | MRR | Chance@1 | Queries |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        task, where = subset_info(name, extra)
        lines.append(f"| {name} | {task or '-'} | {where or '-'} | {100 * r['hit@1']:.1f} | {100 * r['hit@5']:.1f} | "
                     f"{100 * r['mrr']:.1f} | {100 * r['chance@1']:.1f} | {r['queries']} |")
    return "\n".join(lines) + "\n"
