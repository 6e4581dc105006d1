"""Warm start against training from scratch on growth scenarios, with what each night knows before training.

    python -m benchmarks --only warmstart [--quick]

A pool of images is split by content hash (faceclf.dataset.discover, as ingest and `faceclf train` do):
face-mask's photos (../shared/datasets/face-mask, read in place through symlinks) and, for the shifted
scenarios, generated cartoon faces (faceclf.devtools.sample; a quarter at each of four sizes taken from
face-mask's short sides, so that their size alone hardly stands out). Each scenario has two nights: night 1 holds part of the pool, night 2
all of it, so night 2's images only grow and every split (test included) gets its share of the new ones, as
a real night's do. In each split and class, night 1 keeps the lowest sha256 first: a content-defined choice.

    small     night 1: face-mask / 1.1; night 2: all of face-mask (+10% similar images)
    double    night 1: half of face-mask; night 2: all of it (the set doubles)
    big       night 1: a quarter of face-mask; night 2: all of it (the set quadruples)
    shifted   night 1: all of face-mask; night 2: + generated faces, 30% of face-mask's count (a new look)
    big-shift night 1: all of face-mask; night 2: + generated faces, 2.6x face-mask's count (the issue's night:
              3,364 messier images added to 1,279)

Night 1 trains from scratch (default config). Night 2 trains on the same data twice: warm-started from night 1's
checkpoint for warm_epochs (5, the night's default) at night 1's image size, and cold (from scratch, the
default 15 epochs); both are judged on night 2's test split. Seeds 0, 1, 2 (--quick: seed 0, cold 5 epochs,
warm 2, smaller generated sets).

What the night knows before it trains, measured as the night measures it:
  share of new images   1 - night 1's images / night 2's
  drift                 faceclf.nightly.drift.measure of night 2's new images against night 1's train split
                        (decoded cache at night 1's size), with night 1's model as the champion (ONNX): its
                        accuracy on the new images against its own test accuracy
  champion on test      night 1's model (ONNX, as the night re-scores it) on night 2's test split, and whether
                        it is below the default gate bars (gate_failures: min_accuracy, min_class_accuracy)

Rows per scenario: the share of new images, the drift flags, the champion on night 2's test split, then
night 2's test accuracy (mean over seeds; per seed in the note) and wall time (median) of cold and warm; the
baseline of a warm row is the cold row of the same scenario.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._timing import DATASET, machine_rows
from benchmarks.s3_fixture import row

NAME = "warmstart"
GENERATED_QUANTILES = (0.125, 0.375, 0.625, 0.875)  # generated faces: a quarter at each of these quantiles of
                                                   # face-mask's short sides (so their sizes alone do not stand out)


@dataclass(frozen=True)
class Scenario:
    """Night 1 keeps ``night1_share`` of face-mask; night 2 has all of it plus ``generated`` x face-mask's
    count of generated faces (per class in proportion)."""

    name: str
    night1_share: float
    generated: float = 0.0
    what: str = ""


SCENARIOS = (
    Scenario("small", 1 / 1.1, what="+10% similar images"),
    Scenario("double", 0.5, what="the set doubles"),
    Scenario("big", 0.25, what="the set quadruples"),
    Scenario("shifted", 1.0, 0.3, what="+30% generated faces"),
    Scenario("big-shift", 1.0, 2.6, what="+260% generated faces"),
)


def pool(dst: Path, generated: float, quick: bool) -> Path:
    """dst/<class>/: symlinks to face-mask's photos (fm-*) and ``generated`` x their count of generated faces
    (gen<k>-*, half per class)."""
    from faceclf.dataset.discover import short_side
    from faceclf.devtools.sample import generate_sample_faces

    classes = sorted(p.name for p in DATASET.iterdir() if p.is_dir())
    n_photos = 0
    for c in classes:
        (dst / c).mkdir(parents=True, exist_ok=True)
        for p in sorted((DATASET / c).iterdir()):
            if p.is_file():
                (dst / c / f"fm-{p.name}").symlink_to(p.resolve())
                n_photos += 1
    per_class = round(n_photos * generated / len(classes) / (4 if quick else 1))
    sides = sorted(short_side(p) for c in classes for p in (DATASET / c).iterdir() if p.is_file())
    for k, q in enumerate(GENERATED_QUANTILES):  # a quarter of the faces at each of four of face-mask's sizes
        n = per_class * (k + 1) // len(GENERATED_QUANTILES) - per_class * k // len(GENERATED_QUANTILES)
        if not n:
            continue
        gen = dst.parent / f"{dst.name}-gen{k}"
        generate_sample_faces(gen, per_class=n, size=sides[int(q * len(sides))], seed=7 + k, classes=classes)
        for c in classes:
            for p in sorted((gen / c).iterdir()):
                (dst / c / f"gen{k}-{p.name}").symlink_to(p)
    return dst


def tree(faceset, dst: Path, keep) -> int:
    """dst/{train,val,test}/<class>/ symlinks to the images of ``faceset`` that ``keep(split, class, records)``
    keeps (records sorted by sha256); returns the number of images."""
    n = 0
    for split in ("train", "val", "test"):
        for c in faceset.classes:
            records = keep(sorted((r for r in faceset.split(split) if r.label == c), key=lambda r: r.sha256))
            folder = dst / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for r in records:
                p = faceset.file(r).resolve()
                (folder / f"{r.sha256[:16]}{p.suffix}").symlink_to(p)
            n += len(records)
    return n


def night(data: Path, run: Path, seed: int, epochs: int | None, init_from: Path | None,
          image_size: int | str = "auto") -> dict[str, Any]:
    """One training run (default config otherwise): test accuracy, best epoch, image size, wall seconds."""
    import json

    from faceclf.config import RunConfig
    from faceclf.training.launch import run_training

    cfg = RunConfig()
    cfg.training.seed = seed
    cfg.data.image_size = image_size
    if epochs:
        cfg.training.epochs = epochs
    if init_from:
        cfg.training.init_from = str(init_from)
    t0 = time.perf_counter()
    m = run_training(data, run, cfg)
    size = json.loads((run / "config.json").read_text())["data"]["image_size"]
    return {"acc": m["test"]["accuracy"], "best": m["best_epoch"], "s": time.perf_counter() - t0, "size": size,
            "per_class": m["test"]["per_class_accuracy"]}


def knows(n1_data: Path, n2_data: Path, run1: Path, m1: dict[str, Any], cache_dir: Path) -> dict[str, Any]:
    """What night 2 knows before it trains, with night 1's model as the champion: the champion on night 2's
    test split (and the default bars it misses), and the drift checks of night 2's new images."""
    from faceclf.config import MIN_ACCURACY, MIN_CLASS_ACCURACY, SPLIT_FRACTIONS, DataConfig, DriftConfig
    from faceclf.dataset.cache import update_cache
    from faceclf.dataset.discover import discover
    from faceclf.dataset.preprocess import Preprocess
    from faceclf.nightly.drift import measure, new_mask, spread
    from faceclf.nightly.gate import gate_failures
    from faceclf.serving.export import export_onnx
    from faceclf.serving.onnx_model import accuracy_on, evaluate_onnx

    model = export_onnx(run1 / "checkpoint.pt", run1 / "model.onnx").path
    f1, f2 = discover(n1_data, SPLIT_FRACTIONS, 2), discover(n2_data, SPLIT_FRACTIONS, 2)
    old = {i.sha256 for i in f1.images}
    new = [i.sha256 for i in f2.images if i.sha256 not in old]
    on_test = evaluate_onnx(model, f2)
    cfg = DriftConfig()
    fresh = spread(f2.images.take(new_mask(f2, new)), cfg.sample)
    champion_new = accuracy_on(model, [f2.file(i) for i in fresh], [i.label for i in fresh]) if len(fresh) else None
    cache, _ = update_cache(f2, cache_dir, Preprocess.from_config(DataConfig(image_size=m1["size"])))
    drift = measure(f2, new, cache, cfg, champion_new, m1["acc"])
    return {"share": len(new) / len(f2.images), "n1": len(f1.images), "n2": len(f2.images),
            "champion_test": on_test["accuracy"], "champion_per_class": on_test["per_class_accuracy"],
            "below_bars": gate_failures(on_test, MIN_ACCURACY, MIN_CLASS_ACCURACY), "champion_new": champion_new,
            "flags": drift.flags, "drift": drift}


def short_flag(flag: str) -> str:
    """The check a drift flag names: 'brightness', 'class balance', 'image sizes', 'champion'."""
    return "champion" if flag.startswith("the champion") else flag.split(" moved", 1)[0]


def run(quick: bool = False) -> list[dict]:
    """Per scenario and seed: night 1 from scratch; night 2 cold and warm on the same data; what night 2 knows."""
    import logging

    from faceclf.config import SPLIT_FRACTIONS, WARM_EPOCHS
    from faceclf.dataset.discover import discover

    logging.getLogger("faceclf").setLevel(logging.WARNING)
    seeds, cold_epochs, warm_epochs = ((0,), 5, 2) if quick else ((0, 1, 2), None, WARM_EPOCHS)
    rows = machine_rows(NAME)
    with tempfile.TemporaryDirectory(prefix="faceclf-warmstart-") as tmp:
        root = Path(tmp)
        for sc in SCENARIOS:
            base = root / sc.name
            faceset = discover(pool(base / "pool", sc.generated, quick), SPLIT_FRACTIONS, 2)

            def first(records: list, share: float = sc.night1_share) -> list:  # night 1: face-mask's photos only
                photos = [r for r in records if Path(r.path).name.startswith("fm-")]
                return photos[:max(1, round(len(photos) * share))]

            tree(faceset, base / "night1", first)
            tree(faceset, base / "night2", lambda records: records)
            got: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": [], "knows": []}
            for seed in seeds:
                m1 = night(base / "night1", base / f"n1-s{seed}", seed, cold_epochs, None)
                got["knows"].append(knows(base / "night1", base / "night2", base / f"n1-s{seed}", m1, base / "cache"))
                got["knows"][-1]["m1"] = m1
                got["cold"].append(night(base / "night2", base / f"cold-s{seed}", seed, cold_epochs, None))
                got["warm"].append(night(base / "night2", base / f"warm-s{seed}", seed, warm_epochs,
                                         base / f"n1-s{seed}" / "checkpoint.pt", m1["size"]))
            rows += scenario_rows(sc, seeds, got, warm_epochs, cold_epochs)
    return rows


def scenario_rows(sc: Scenario, seeds: tuple[int, ...], got: dict[str, list[dict[str, Any]]], warm_epochs: int,
                  cold_epochs: int | None) -> list[dict]:
    """The rows of one scenario (see the module docstring)."""
    from faceclf.config import EPOCHS

    k0, ks = got["knows"][0], got["knows"]
    out = [row(NAME, f"{sc.name}: share of new images", round(k0["share"], 3), "share", note=f"{sc.what}: night 1 {k0['n1']} images, night 2 {k0['n2']} ({k0['n2'] - k0['n1']} new)")]
    flags = [sorted({short_flag(f) for f in k["flags"]}) for k in ks]
    d = k0["drift"]
    out.append(row(NAME, f"{sc.name}: drift checks flagged", statistics.mean(len(f) for f in flags), "checks",
                   note="; ".join(f"seed {s}: {', '.join(f) or 'none'}" for s, f in zip(seeds, flags))
                   + f"; class shift {d.class_shift}, size KS {d.size_ks}, brightness KS {d.brightness_ks}, "
                   "champion on new images " + ", ".join(f"{k['champion_new']:.3f}" if k["champion_new"] is not None
                                                         else "n/a" for k in ks)))
    out.append(row(NAME, f"{sc.name}: champion on night 2 test", statistics.mean(k["champion_test"] for k in ks),
                   "acc", note="; ".join(
                       f"seed {s}: {k['champion_test']:.3f} (" + ", ".join(f"{c} {a:.3f}" for c, a in
                                                                          k["champion_per_class"].items())
                       + f"; {'below the bars' if k['below_bars'] else 'clears the bars'}; on night 1's test "
                       f"{k['m1']['acc']:.3f})" for s, k in zip(seeds, ks))))
    cold_acc, cold_s = statistics.mean(r["acc"] for r in got["cold"]), statistics.median(r["s"] for r in got["cold"])
    for way, epochs in (("cold", cold_epochs or EPOCHS), ("warm", warm_epochs)):
        rs = got[way]
        acc, secs = statistics.mean(r["acc"] for r in rs), statistics.median(r["s"] for r in rs)
        per_seed = ", ".join(f"seed {s}: {r['acc']:.3f} (best epoch {r['best']}, {r['s']:.1f} s)"
                             for s, r in zip(seeds, rs))
        is_base = way == "cold"
        out.append(row(NAME, f"{sc.name}: night 2 {way} {epochs} ep: test acc", acc, "acc",
                       None if is_base else f"{sc.name} cold", None if is_base else cold_acc, per_seed))
        out.append(row(NAME, f"{sc.name}: night 2 {way}: wall time", secs, "s", None if is_base else f"{sc.name} cold",
                       None if is_base else cold_s, "median over seeds"))
    return out
