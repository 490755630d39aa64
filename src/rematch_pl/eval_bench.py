"""`python -m rematch_pl.eval_bench --suite encode|memory|roofline [--shape tiny|2b|7b] [--out FILE.json]`: figures, not tests.

Encode throughput (items/s) of the evaluation engine (`rematch_pl.evaluation.engine`: length
bucketing, DataLoader workers decoding JPEG files, bf16 on GPU, K=16 learnable tokens, chat
template, LoRA r=32 merged into the weights as `rematch_pl.eval` does by default, or kept as
PEFT's separate branch with ``--lora separate``) on random-weight backbones built by `rematch_pl.bench.shaped_backbone` (tiny on CPU;
Qwen2-VL-2B/7B-shaped on a GPU, no download), for image items (instruction + image at MMEB-like
sizes) and text items (labels, answers, captions) separately; then the projected wall time of the
full 36-subset MMEB evaluation on one device:

    T = N_image_items / rate_image + N_text_items / rate_text

with the unique item counts of MMEB-eval read from a local clone (``--mmeb PATH``), or else an
assumed count (`ASSUMED_COUNTS`: 1,000 queries per subset, and per subset at most 10,000 unique
candidates: the label set for classification); the assumption is printed with the result.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

# MMEB-eval subsets: (query modality, candidate modality, assumed unique candidates)
_LABELS = {"ImageNet-1K": 1000, "N24News": 24, "HatefulMemes": 2, "VOC2007": 20, "SUN397": 397, "Place365": 365,
           "ImageNet-A": 200, "ImageNet-R": 200, "ObjectNet": 313, "Country211": 211}
_RET = {"VisDial": ("text", "image"), "CIRR": ("image", "image"), "VisualNews_t2i": ("text", "image"),
        "VisualNews_i2t": ("image", "text"), "MSCOCO_t2i": ("text", "image"), "MSCOCO_i2t": ("image", "text"),
        "NIGHTS": ("image", "image"), "WebQA": ("text", "image"), "FashionIQ": ("image", "image"),
        "Wiki-SS-NQ": ("text", "image"), "OVEN": ("image", "image"), "EDIS": ("text", "image")}
_VQA = ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
        "TextVQA")
_VG = ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing")
QUERIES, CANDIDATES = 1000, 10000


def assumed_counts() -> dict[str, int]:
    """Unique image / text items of the 36 subsets under the stated assumption."""
    img = txt = 0
    for n in _LABELS.values():
        img, txt = img + QUERIES, txt + n
    for _ in _VQA:
        img, txt = img + QUERIES, txt + CANDIDATES
    for q, c in _RET.values():
        img += (QUERIES if q == "image" else 0) + (CANDIDATES if c == "image" else 0)
        txt += (QUERIES if q == "text" else 0) + (CANDIDATES if c == "text" else 0)
    img += len(_VG) * (QUERIES + CANDIDATES)
    return {"image_items": img, "text_items": txt, "source": "assumed: 1000 queries/subset, <= 10000 unique "
            "candidates/subset (classification: its label set); --mmeb PATH counts the real ones"}


def counted(path: str, image_root: str | None) -> dict:
    """Unique (item, side) encodings with / without an image, read from a local MMEB-eval clone."""
    from .data.mmeb import list_subsets, load_eval_subset

    img = txt = 0
    for s in list_subsets(path):
        es = load_eval_subset(path, image_root, s, check_images=False)
        need = {(i, "qry") for i in es.queries} | {(c, "doc") for cs in es.candidates for c in cs}
        for i, _ in need:
            if es.items[i][1]:
                img += 1
            else:
                txt += 1
    return {"image_items": img, "text_items": txt, "source": f"counted in {path}"}


def _images(folder: Path, n: int, sizes: list[tuple[int, int]], seed: int = 0) -> list[str]:
    """JPEG files with smooth random content (decoding cost like photos)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        low = (torch.rand(3, max(2, h // 32), max(2, w // 32), generator=g) * 255)
        img = torch.nn.functional.interpolate(low[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        p = folder / f"{i:05d}.jpg"
        Image.fromarray(img.clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(p, quality=90)
        paths.append(str(p))
    return paths


_QUESTIONS = ["What is the color of the car on the left?", "How many people are in the picture?",
              "What is written on the sign?", "Which animal is shown?", "What is the man holding?"]
_TEXTS = ["dog", "a tabby cat sleeping on a sofa", "Represent the answer: two",
          "Two people riding bicycles along a river at sunset, with tall buildings in the background.",
          "Represent the class label: golden retriever",
          "The minister announced on Tuesday that the new railway line connecting the two largest cities of the "
          "region will open next spring, two years later than planned, after a long dispute over costs."]


def suite_encode(shape: str, device: str, dtype: str, n_image: int, n_text: int, batch: int, workers: int,
                 sizes: list[tuple[int, int]], mmeb: str | None, mmeb_images: str | None,
                 lora: str = "merged", max_tokens: int | None = None, compile: bool = False) -> dict:
    from .backbone.model import DTYPES, compile_backbone
    from .bench import llm_forward_flops, matmul_peak_tflops, shaped_backbone, vision_flops
    from .evaluation.engine import Engine, Request, estimate_image_tokens
    from .model import ReMatchModel

    torch.manual_seed(0)
    t0 = time.perf_counter()
    bb = shaped_backbone(shape, device, dtype)  # LoRA r=32 on the LLM's projections, as trained
    if lora == "merged":  # as `rematch_pl.eval` loads a LoRA checkpoint by default (eval.merge_lora=true)
        bb.merge_lora()
    if compile:  # as eval.compile=true: after the merge; the warm-up below compiles
        compile_backbone(bb)
    model = ReMatchModel(bb, k=16, matching="none", template="chat").to(device, DTYPES[dtype]).eval()
    model.requires_grad_(False)
    build_s = time.perf_counter() - t0
    rng = random.Random(0)
    res = {"shape": shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "dtype": dtype, "batch": batch, "max_tokens": max_tokens, "workers": workers, "image_sizes": [f"{w}x{h}" for w, h in sizes],
           "build_s": round(build_s, 1), "k": 16, "template": "chat", "lora": lora,
           "compile": compile}
    with tempfile.TemporaryDirectory() as tmp:
        paths = _images(Path(tmp), n_image + batch, sizes)
        img_reqs = [Request(f"<|image_1|>\nRepresent the given image with the following question: "
                            f"{rng.choice(_QUESTIONS)} ({i})", p, "qry") for i, p in enumerate(paths)]
        txt_reqs = [Request(f"{rng.choice(_TEXTS)} ({i})", None, "doc") for i in range(n_text + batch)]
        engine = Engine(model, None, None, batch_size=batch, max_tokens=max_tokens, num_workers=workers,
                        max_length=2048, progress=False)
        engine.encode(img_reqs[:batch] + txt_reqs[:batch], desc="warm-up")  # kernels, allocator, workers
        peak = matmul_peak_tflops(device)
        res["matmul_peak_tflops"] = round(peak, 1)
        merge2 = bb.merge ** 2
        for kind, reqs in (("image", img_reqs[batch:]), ("text", txt_reqs[batch:])):
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            model.reset_counts()
            wait0, model0 = engine.stats["data_wait_s"], engine.stats["model_s"]
            t = time.perf_counter()
            engine.encode(reqs, desc=kind)
            if device == "cuda":
                torch.cuda.synchronize()
                res[f"{kind}_peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            dt = time.perf_counter() - t
            counts = model.reset_counts()
            patches = [estimate_image_tokens(r.image, bb.processor) * merge2 for r in reqs if r.image]
            flops = llm_forward_flops(bb, counts.get("embed", 0), counts.get("embed_attn", 0)) + vision_flops(bb, patches)
            res[f"{kind}_items"] = len(reqs)
            res[f"{kind}_s"] = round(dt, 2)
            res[f"{kind}_data_wait_s"] = round(engine.stats["data_wait_s"] - wait0, 2)  # waiting for the workers
            res[f"{kind}_model_s"] = round(engine.stats["model_s"] - model0, 2)  # collate + forward, synced
            res[f"{kind}_items_per_s"] = round(len(reqs) / dt, 2)
            res[f"{kind}_tokens_per_item"] = round(counts.get("embed", 0) / len(reqs), 1)
            res[f"{kind}_patches_per_item"] = round(sum(patches) / len(reqs), 1)
            res[f"{kind}_tflop_per_item"] = flops / len(reqs) / 1e12
            res[f"{kind}_tflops"] = round(flops / dt / 1e12, 2)  # achieved
            res[f"{kind}_mfu"] = flops / dt / 1e12 / peak if device == "cuda" else float("nan")
    counts = counted(mmeb, mmeb_images) if mmeb else assumed_counts()
    proj = counts["image_items"] / res["image_items_per_s"] + counts["text_items"] / res["text_items_per_s"]
    # the same items at the card's full matrix-product peak: the floor no engine can beat
    floor = (counts["image_items"] * res["image_tflop_per_item"] + counts["text_items"] * res["text_tflop_per_item"]) \
        / peak if device == "cuda" else float("nan")
    res["mmeb_floor_at_peak_s"] = round(floor, 1)
    res["mmeb_counts"] = counts
    res["mmeb_projected_s"] = round(proj, 1)
    res["mmeb_projected_h"] = round(proj / 3600, 2)
    return res


def _meta_eval_model(shape: str, dtype: str):
    """The evaluated model on the meta device (no weights read): the shaped backbone, LoRA merged
    as `rematch_pl.eval` does by default, K=16, chat template, no matching head."""
    from .backbone.model import DTYPES
    from .bench import shaped_backbone
    from .memory import meta_copy
    from .model import ReMatchModel

    bb = shaped_backbone(shape, "meta", dtype) if shape != "tiny" else meta_copy(shaped_backbone("tiny", "cpu", dtype))
    bb.merge_lora()
    model = meta_copy(ReMatchModel(bb, k=16, matching="none", template="chat").to(DTYPES[dtype]).eval())
    model.requires_grad_(False)
    return model


def suite_memory(shape: str, configs: list[tuple[int, int | None]], size: tuple[int, int], dtype: str = "bf16",
                 target: str = "cuda", gpu_gib: float = 79.0, reserve_gib: float = 4.0) -> dict:
    """Planned peak memory of the evaluation forward, no device needed (`memory.encode_memory`).

    For each (batch rows, max_tokens) the worst batch the engine can form is planned: image items
    of the largest MMEB-like size (instruction + question + image), as many rows as fit both caps
    (the engine's `make_batches` rule), LoRA merged, on the real-size model built on meta.
    """
    from .backbone.model import DTYPES
    from .evaluation.engine import _Units, collate_units, make_batches
    from .memory import GiB, encode_memory

    torch.manual_seed(0)
    model = _meta_eval_model(shape, dtype)
    bb = model.backbone
    budget = gpu_gib - reserve_gib
    res = {"shape": shape, "dtype": dtype, "target": target, "image_size": f"{size[0]}x{size[1]}",
           "gpu_gib": gpu_gib, "reserve_gib": reserve_gib, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        (path,) = _images(Path(tmp), 1, [size])
        text = f"<|image_1|>\nRepresent the given image with the following question: {max(_QUESTIONS, key=len)}"
        unit = _Units([(path, [0], [text])], bb.processor, None, pixel_dtype=DTYPES[dtype])[0]
    length = len(unit[1][0]) + model.fusion.k + 32  # as the engine estimates it
    n_patches = int(unit[3].prod())
    print(f"\nbench encode memory: Qwen2-VL-{shape} shape, {dtype}, LoRA merged, {size[0]}x{size[1]} images "
          f"({n_patches} patches, ~{length} tokens per row), planned for {target} (budget {gpu_gib:g} - "
          f"{reserve_gib:g} GiB reserve = {budget:g} GiB)", flush=True)
    for rows_cap, max_tokens in configs:
        first = make_batches([length] * rows_cap, [1] * rows_cap, rows_cap, max_tokens)[0]
        n = len(first)
        batch = collate_units([([i], unit[1], unit[2].to("meta"), unit[3]) for i in range(n)], bb.processor)
        t = time.perf_counter()
        r = {k: v / GiB for k, v in encode_memory(model, batch, [["qry"]] * n, meta=True, target=target).items()}
        row = {"batch": rows_cap, "max_tokens": max_tokens, "rows": n, "patches": n * n_patches,
               **{f"{k}_gib": v for k, v in r.items()}, "fits": r["peak"] <= budget,
               "planned_in_s": time.perf_counter() - t}
        res["runs"].append(row)
        print(f"  batch {rows_cap:<4} max_tokens {max_tokens!s:<6} -> {n:4d} rows, {n * n_patches:7d} patches: weights "
              f"{r['weights']:7.3f}  inputs {r['inputs']:6.3f}  activations {r['transient']:7.3f}  peak "
              f"{r['peak']:7.3f} GiB  {'fits' if row['fits'] else 'DOES NOT FIT'}", flush=True)
    return res


def suite_roofline(shape: str, sizes: list[tuple[int, int]], rows: int, mmeb: str | None, mmeb_images: str | None,
                   dtype: str = "bf16", tflops: float | None = None, tbs: float | None = None) -> dict:
    """Roofline time per item of the evaluation forward (`bench.roofline`: every kernel at the
    card's matmul peak or memory bandwidth, no gaps; no device needed) and from it the floor of the
    full MMEB evaluation with eager kernels, beside the FLOP-only floor (what fusing every
    memory-bound kernel away could reach). Image items: `rows` items per image size, one batch each
    (instruction + question + image, as the encode suite); text items: 16 x `rows` MMEB-like texts
    sorted by length (the engine's text batches are long and sorted)."""
    from .backbone.model import DTYPES
    from .bench.roofline import H100_TBS, H100_TFLOPS, OpCost
    from .evaluation.engine import _Units, collate_units, embed_batch

    tflops, tbs = tflops or H100_TFLOPS, tbs or H100_TBS
    torch.manual_seed(0)
    model = _meta_eval_model(shape, dtype)
    bb = model.backbone

    def cost(units: list) -> dict:
        batch = collate_units([(u[0], u[1], None if u[2] is None else u[2].to("meta"), u[3]) for u in units],
                              bb.processor)
        c = OpCost("meta", bb)
        with c:
            embed_batch(model, batch, [["qry"]] * len(units), "meta", DTYPES[dtype], out_device="meta")
        return c.summary(tflops, tbs)

    res = {"shape": shape, "dtype": dtype, "lora": "merged", "k": 16, "template": "chat", "rows": rows,
           "image_sizes": [f"{w}x{h}" for w, h in sizes], "matmul_peak_tflops": tflops, "bandwidth_tbs": tbs}
    rng = random.Random(0)
    per_size = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            (path,) = _images(Path(tmp), 1, [size])
            texts = [f"<|image_1|>\nRepresent the given image with the following question: {rng.choice(_QUESTIONS)}"
                     for _ in range(rows)]
            loaded = _Units([(path, list(range(rows)), texts)], bb.processor, None, pixel_dtype=DTYPES[dtype])[0]
            # one unit per item (each item its own image, as distinct MMEB images are)
            units = [([i], [loaded[1][i]], loaded[2], loaded[3]) for i in range(rows)]
            per_size.append(cost(units))
    # text items as the engine batches them: sorted by length, 16x as many rows per pass
    n_txt = 16 * rows
    ids = sorted((bb.processor.encode_content(f"{rng.choice(_TEXTS)} ({i})", None) for i in range(n_txt)),
                 key=len, reverse=True)
    txt = cost([([i], [x], None, None) for i, x in enumerate(ids)])
    n = rows * len(sizes)
    img = {k: sum(s[k] for s in per_size) / n for k in ("roofline_ms", "matrix_ms", "memory_ms", "tflop", "gbytes")}
    res["image"] = dict(img, vision_ms=sum(s["regions"]["vision"]["roofline_ms"] for s in per_size) / n,
                        mfu_ceiling=img["tflop"] / tflops / img["roofline_ms"] * 1e3)
    res["text"] = {k: txt[k] / n_txt for k in ("roofline_ms", "matrix_ms", "memory_ms", "tflop", "gbytes")}
    counts = counted(mmeb, mmeb_images) if mmeb else assumed_counts()
    res["mmeb_counts"] = counts
    floor = lambda key: (counts["image_items"] * res["image"][key] + counts["text_items"] * res["text"][key]) / 1e3  # noqa: E731
    res["mmeb_roofline_s"] = floor("roofline_ms")
    res["mmeb_matrix_only_s"] = floor("matrix_ms")
    from .bench import print_rows

    print_rows(f"bench encode roofline: Qwen2-VL-{shape} shape, {dtype}, LoRA merged, K=16, chat template; "
               f"{tflops:g} TFLOP/s matrix peak, {tbs:g} TB/s (H100 defaults)", [
        ("image item", f"{res['image']['roofline_ms']:.2f} ms at best (matrix + attention {res['image']['matrix_ms']:.2f}, "
                       f"memory-bound {res['image']['memory_ms']:.2f}; vision tower {res['image']['vision_ms']:.2f}), "
                       f"{res['image']['tflop'] * 1e3:.0f} GFLOP, {res['image']['gbytes']:.1f} GB, MFU ceiling "
                       f"{res['image']['mfu_ceiling']:.0%}  (sizes {', '.join(res['image_sizes'])})"),
        ("text item", f"{res['text']['roofline_ms']:.3f} ms at best (matrix + attention {res['text']['matrix_ms']:.3f}, "
                      f"memory-bound {res['text']['memory_ms']:.3f})"),
        ("MMEB-eval unique items", f"{counts['image_items']} image + {counts['text_items']} text ({counts['source']})"),
        ("full MMEB eval, eager kernels", f">= {res['mmeb_roofline_s'] / 60:.1f} min on one device"),
        ("  matrix products alone", f">= {res['mmeb_matrix_only_s'] / 60:.1f} min (every memory-bound kernel fused away)"),
    ])
    return res


def print_table(res: dict) -> None:
    c = res["mmeb_counts"]
    rows = [
        ("model", f"Qwen2-VL-{res['shape']}-shaped, random weights, K=16, chat template, {res['dtype']}, "
                  f"LoRA r=32 {res['lora']}"),
        ("device", res["device"]),
        ("image items (instruction + image)", f"{res['image_items_per_s']:.1f} items/s  ({res['image_items']} in "
                                               f"{res['image_s']:.1f} s, sizes {', '.join(res['image_sizes'])})"),
        ("  of which", f"model {res['image_model_s']:.1f} s, waiting for inputs {res['image_data_wait_s']:.1f} s"),
        ("text items", f"{res['text_items_per_s']:.1f} items/s  ({res['text_items']} in {res['text_s']:.1f} s)"),
        ("  of which", f"model {res['text_model_s']:.1f} s, waiting for inputs {res['text_data_wait_s']:.1f} s"),
        ("work per image item", f"{res['image_tflop_per_item'] * 1e3:.1f} GFLOP ({res['image_patches_per_item']:.0f} patches, "
                                f"{res['image_tokens_per_item']:.0f} LLM tokens); achieved {res['image_tflops']:.1f} "
                                f"TFLOP/s" + (f", MFU {res['image_mfu'] * 100:.0f}%" if res["image_mfu"] == res["image_mfu"] else "")),
        ("work per text item", f"{res['text_tflop_per_item'] * 1e3:.3f} GFLOP ({res['text_tokens_per_item']:.0f} tokens); "
                               f"achieved {res['text_tflops']:.2f} TFLOP/s"),
        ("MMEB-eval unique items", f"{c['image_items']} image + {c['text_items']} text ({c['source']})"),
        ("projected full MMEB eval, 1 device",
         f"{res['mmeb_projected_s'] / 60:.1f} min ({res['mmeb_projected_h']:.2f} h)"),
    ]
    if res["mmeb_floor_at_peak_s"] == res["mmeb_floor_at_peak_s"]:
        rows.append(("the same FLOPs at the matmul peak", f"{res['mmeb_floor_at_peak_s'] / 60:.1f} min "
                                                           f"({res['matmul_peak_tflops']:.0f} TFLOP/s)"))
    from .bench import print_rows

    print_rows(f"bench encode: batch={res['batch']} max_tokens={res['max_tokens']} workers={res['workers']}", rows)


def parser() -> argparse.ArgumentParser:
    """The command line's arguments (`scripts/gpu_bench.sh`'s command lines are checked against it)."""
    ap = argparse.ArgumentParser(prog="python -m rematch_pl.eval_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["encode", "memory", "roofline"], default="encode",
                    help="encode: throughput; memory: planned peak of the eval forward on meta (no device); "
                         "roofline: the eval forward's time with perfect kernels and the MMEB floor (no device)")
    ap.add_argument("--rows", type=int, default=16, help="roofline suite: items per batch counted")
    ap.add_argument("--configs", default="32:none,64:none,512:32768,512:65536",
                    help="memory suite: ROWS:MAX_TOKENS list (none: no token cap)")
    ap.add_argument("--gpu-gib", type=float, default=79.0, help="memory suite: the card's memory")
    ap.add_argument("--reserve-gib", type=float, default=4.0, help="memory suite: kept free for context, fragmentation")
    ap.add_argument("--shape", choices=["tiny", "2b", "7b"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="fp32 (CPU default) or bf16 (GPU default)")
    ap.add_argument("--n-image", type=int, default=None, help="image items timed (default 64 tiny, 512 otherwise)")
    ap.add_argument("--n-text", type=int, default=None, help="text items timed (default 128 tiny, 2048 otherwise)")
    ap.add_argument("--batch", type=int, default=256, help="rows per forward pass at most (eval.batch_size)")
    ap.add_argument("--max-tokens", type=int, default=32768,
                    help="and rows x longest sequence at most (eval.max_tokens; 0: no cap)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 0 on CPU, 8 on GPU)")
    ap.add_argument("--image-sizes", default=None,
                    help="WxH list (default 112x112,84x112 tiny; 640x480,500x375,1024x768 otherwise: MMEB-like)")
    ap.add_argument("--mmeb", default=None, help="local MMEB-eval clone: count its unique items for the projection")
    ap.add_argument("--mmeb-images", default=None, help="its image root (only needed for the counts' paths)")
    ap.add_argument("--lora", choices=["merged", "separate"], default="merged",
                    help="LoRA r=32 folded into the weights (eval's default) or PEFT's separate branch")
    ap.add_argument("--compile", action="store_true",
                    help="encode suite: torch.compile the decoder layers and vision blocks (eval.compile=true)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--tokenizer", default=None,
                    help="2b/7b shapes: the text tokenizer (as `python -m rematch_pl.bench --tokenizer`; default "
                         "$REMATCH_BENCH_TOKENIZER, else the tiny model's 640-entry BPE)")
    ap.add_argument("--out", type=Path, default=None)
    return ap


def main(argv=None) -> dict:
    ap = parser()
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from .bench import write_results
    from .bench.common import use_bench_tokenizer

    tokenizer = use_bench_tokenizer(a.tokenizer)

    def write(res: dict) -> dict:
        res["tokenizer"] = tokenizer
        write_results(res, a.out)
        return res

    tiny = a.shape == "tiny"
    if a.suite == "memory":
        size = tuple(int(x) for x in (a.image_sizes or ("112x112" if tiny else "1024x768")).split(",")[0].split("x"))
        configs = [(int(r), None if t == "none" else int(t)) for r, t in (c.split(":") for c in a.configs.split(","))]
        res = suite_memory(a.shape, configs, size, a.dtype or "bf16", "cuda" if not tiny else "cpu", a.gpu_gib,
                           a.reserve_gib)
        return write(res)
    if a.suite == "roofline":
        sizes = [tuple(int(x) for x in s.split("x")) for s in
                 (a.image_sizes or ("112x112,84x112" if tiny else "640x480,500x375,1024x768")).split(",")]
        res = suite_roofline(a.shape, sizes, a.rows, a.mmeb, a.mmeb_images, a.dtype or "bf16")
        return write(res)
    dtype = a.dtype or ("bf16" if a.device == "cuda" else "fp32")
    sizes = a.image_sizes or ("112x112,84x112" if tiny else "640x480,500x375,1024x768")
    sizes = [tuple(int(x) for x in s.split("x")) for s in sizes.split(",")]
    workers = a.workers if a.workers is not None else (8 if a.device == "cuda" else 0)
    n_image, n_text = a.n_image or (64 if tiny else 512), a.n_text or (128 if tiny else 2048)
    res = suite_encode(a.shape, a.device, dtype, n_image, n_text, a.batch, workers, sizes, a.mmeb, a.mmeb_images,
                       a.lora, a.max_tokens or None, compile=a.compile)
    print_table(res)
    return write(res)


if __name__ == "__main__":
    main()
