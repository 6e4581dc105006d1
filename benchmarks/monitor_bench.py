"""How close the label-free accuracy estimate (faceclf.serving.monitor, CBPE) comes to the true accuracy.

    python -m benchmarks --only monitor [--quick]

Champion A is trained on face-mask (../shared/datasets/face-mask, or $FACECLF_GATE_DATA: a folder of class
folders) with the default config through faceclf.training.launch.run_training and exported to ONNX twice:
calibrated (the checkpoint's fitted temperature, as `faceclf export` writes it) and with the temperature forced
to 1.0 (the same checkpoint dict with "temperature": 1.0, saved and exported): the uncalibrated probabilities.
A default run usually gets every val image right, and then fit_temperature leaves T at 1.0 (the val split
cannot set it): the two exports are the same model. Champion B (same data, WEAK_EPOCHS epochs, default config
otherwise) is an under-trained model whose val split has errors, so that calibration has something to do.

Labelled sets, each written to a folder of class folders and scored by score_images as a scoring run scores
(the monitor block of predictions.json); the true accuracy is each row's predicted_class against its folder:

    test          the champion's own test split (splits.csv), the files as they are
    noise 25/75   Gaussian noise, sigma 25 / 75 (of 255) per pixel and channel
    blur 2%/5%    Gaussian blur, radius 2% / 5% of the short side
    contrast 0.3  contrast reduced to 30% (PIL ImageEnhance.Contrast)
    jpeg q5       re-encoded as JPEG at quality 5
    rotate 90     turned by 90 degrees
    grayscale     luminance only (as RGB)
    generated     generated faces (faceclf.devtools.sample, drawn cartoons, not photos): another look, same classes

The shifted sets start from the test images with their short side brought down to at most 320 px (face-mask's
median; most are already there), so that noise and blur mean the same thing on a 3,456 px photo as on a 320 px
one; they are written as PNG (lossless) but for the jpeg set.

Rows per champion and set: value = the estimate (calibrated model), baseline = the true accuracy; the note
holds n, the interval, estimate - truth, inside the interval or not, the alarms (default MonitorConfig), and the
same with the T=1 model. Then: mean absolute error of the estimate (calibrated vs T=1), sets inside their interval, the
sets where an alarm fired against the sets whose true accuracy fell more than accuracy_drop below the test
accuracy, the fitted temperature and metrics.json's ECE before/after. A readable table is printed as well.
--quick: 300 generated faces per class (64 px), champion A 3 epochs, B 1 epoch, the generated set in the "night"
look (the champions were trained on generated faces), 40 per class.
"""

from __future__ import annotations

import csv
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from benchmarks._timing import DATASET, cpu_flags, cpu_model, machine_rows
from benchmarks.s3_fixture import row

NAME = "monitor"
MAX_SIDE = 320          # shifted sets: short side brought down to at most this (face-mask's median) first
GENERATED = (100, 128)  # generated faces "with another look": per class, pixels (--quick: 40 per class, 64 px)
WEAK_EPOCHS = 2         # champion B: under-trained, so that its val split has errors and a temperature is fitted


def dataset() -> Path:
    """$FACECLF_GATE_DATA where set (a folder of class folders), else ../shared/datasets/face-mask."""
    env = os.environ.get("FACECLF_GATE_DATA")
    return Path(env) if env else DATASET


def capped(img: Image.Image) -> Image.Image:
    """RGB, EXIF orientation applied, short side at most MAX_SIDE."""
    img = ImageOps.exif_transpose(img).convert("RGB")
    short = min(img.size)
    if short > MAX_SIDE:
        scale = MAX_SIDE / short
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    return img


def noise(sigma: float) -> Callable[[Image.Image, int], Image.Image]:
    def apply(img: Image.Image, seed: int) -> Image.Image:
        a = np.asarray(img, dtype=np.float32)
        a = a + np.random.default_rng(seed).normal(0.0, sigma, a.shape).astype(np.float32)
        return Image.fromarray(a.clip(0, 255).astype(np.uint8))
    return apply


def blur(share: float) -> Callable[[Image.Image, int], Image.Image]:
    return lambda img, seed: img.filter(ImageFilter.GaussianBlur(max(0.5, share * min(img.size))))


# name -> (transform, file suffix); None: the test files as they are (symlinked)
SHIFTS: dict[str, tuple[Callable[[Image.Image, int], Image.Image] | None, str]] = {
    "test": (None, ""),
    "noise 25": (noise(25), ".png"),
    "noise 75": (noise(75), ".png"),
    "blur 2%": (blur(0.02), ".png"),
    "blur 5%": (blur(0.05), ".png"),
    "contrast 0.3": (lambda img, seed: ImageEnhance.Contrast(img).enhance(0.3), ".png"),
    "jpeg q5": (lambda img, seed: img, ".jpg"),
    "rotate 90": (lambda img, seed: img.rotate(90, expand=True), ".png"),
    "grayscale": (lambda img, seed: img.convert("L").convert("RGB"), ".png"),
}


def test_split(run_dir: Path) -> list[tuple[Path, str]]:
    """(file, class) of the run's test split, from splits.csv."""
    with open(run_dir / "splits.csv", newline="", encoding="utf-8") as f:
        return [(Path(r["path"]), r["class"]) for r in csv.DictReader(f) if r["split"] == "test"]


def write_shifted(test: list[tuple[Path, str]], name: str, dst: Path) -> int:
    """dst/<class>/ holds the test images shifted by SHIFTS[name]; returns the number written."""
    transform, suffix = SHIFTS[name]
    for k, (src, cls) in enumerate(test):
        (dst / cls).mkdir(parents=True, exist_ok=True)
        if transform is None:
            (dst / cls / f"{k:05d}-{src.name}").symlink_to(src.resolve())
            continue
        with Image.open(src) as img:
            out = transform(capped(img), k)
        target = dst / cls / f"{k:05d}{suffix}"
        if suffix == ".jpg":
            out.save(target, quality=5 if name == "jpeg q5" else 95)
        else:
            out.save(target, compress_level=1)
    return len(test)


@dataclass
class Scored:
    """One model on one set: true accuracy and the monitor block, or the error that stopped it."""

    n: int = 0
    errors: int = 0
    truth: float | None = None
    monitor: dict[str, Any] = field(default_factory=dict)
    failed: str = ""

    @property
    def estimate(self) -> float | None:
        return self.monitor.get("estimated_accuracy")

    @property
    def interval(self) -> tuple[float, float] | None:
        got = self.monitor.get("interval")
        return (got[0], got[1]) if got else None

    @property
    def inside(self) -> bool | None:
        if self.truth is None or self.interval is None:
            return None
        return self.interval[0] <= self.truth <= self.interval[1]

    @property
    def alarms(self) -> list[str]:
        return list(self.monitor.get("alarms") or [])

    @property
    def accuracy_alarm(self) -> bool:
        return any(a.startswith("estimated accuracy") for a in self.alarms)

    def short(self) -> str:
        if self.failed:
            return f"FAILED: {self.failed}"
        if self.estimate is None:
            return "no scored image"
        low, high = self.interval
        acc, share = sum(a.startswith("estimated accuracy") for a in self.alarms), \
            sum(a.startswith("class ") for a in self.alarms)
        return (f"est {self.estimate:.4f} [{low:.4f}, {high:.4f}], est-truth {self.estimate - self.truth:+.4f}, "
                f"inside {'yes' if self.inside else 'no'}, alarms {len(self.alarms)} (accuracy {acc}, share {share})")


def score(model: Path, folder: Path, out: Path) -> Scored:
    """score_images on ``folder`` (class folders) into out/predictions.csv; the true accuracy from the rows."""
    from faceclf.serving.stream import score_images

    try:
        summary = score_images(model, [folder], out / "predictions.csv")
        right = n = errors = 0
        with open(summary.out, newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                if r["error"]:
                    errors += 1
                    continue
                n += 1
                right += r["predicted_class"] == PurePosixPath(r["path"].replace("\\", "/")).parent.name
        return Scored(n, errors, right / n if n else None, summary.monitor or {})
    except Exception as e:  # noqa: BLE001 - one set that cannot be scored is reported, the rest go on
        return Scored(failed=f"{type(e).__name__}: {e}"[:200])


def train(data: Path, run_dir: Path, epochs: int | None) -> tuple[dict[str, Any], float]:
    """(metrics.json, wall seconds) of a default training run on ``data``."""
    from faceclf.config import RunConfig
    from faceclf.training.launch import run_training

    cfg = RunConfig()
    if epochs:
        cfg.training.epochs = epochs
    t0 = time.perf_counter()
    metrics = run_training(data, run_dir, cfg)
    return metrics, time.perf_counter() - t0


def export_both(run_dir: Path, out: Path) -> tuple[Path, Path, float]:
    """(calibrated model, T=1 model, fitted temperature): the checkpoint exported as is, and a copy of its dict
    with "temperature": 1.0 exported the same way."""
    from faceclf.serving.export import export_onnx, temperature_of
    from faceclf.training.checkpoint import load_checkpoint, save_checkpoint

    calibrated = export_onnx(run_dir / "checkpoint.pt", out / "model.onnx").path
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    (out / "t1").mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "t1" / "checkpoint.pt", {**ckpt, "temperature": 1.0})
    uncalibrated = export_onnx(out / "t1" / "checkpoint.pt", out / "t1" / "model.onnx").path
    return calibrated, uncalibrated, temperature_of(ckpt)


def fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict[str, tuple[Scored, Scored]], test_accuracy: float, drop_bar: float) -> None:
    """The readable per-set table, printed as the run goes."""
    print(f"\nmonitor: label-free estimate vs true accuracy (reference: test accuracy {test_accuracy:.4f}; "
          f"drop: true accuracy more than {drop_bar:g} below it; alarms: accuracy+share)", flush=True)
    print(f"{'set':<13} {'n':>5} {'true':>7} {'drop':>4} {'est':>7} {'interval':>17} {'est-true':>8} {'in':>3} "
          f"{'alarms':>6} | {'est T=1':>7} {'interval T=1':>17} {'est-true':>8} {'in':>3} {'alarms':>6}")
    for name, (cal, unc) in results.items():
        if cal.failed or cal.truth is None:
            print(f"{name:<13} {cal.short()}")
            continue

        def part(s: Scored) -> str:
            if s.failed or s.estimate is None or s.truth is None:
                return f"{s.short()[:60]}"
            low, high = s.interval
            acc = sum(a.startswith("estimated accuracy") for a in s.alarms)
            return (f"{s.estimate:>7.4f} {f'[{low:.3f}, {high:.3f}]':>17} {s.estimate - s.truth:>+8.4f} "
                    f"{'yes' if s.inside else 'no':>3} {f'{acc}+{len(s.alarms) - acc}':>6}")

        drop = "yes" if test_accuracy - cal.truth > drop_bar else "no"
        print(f"{name:<13} {cal.n:>5} {cal.truth:>7.4f} {drop:>4} {part(cal)} | {part(unc)}", flush=True)


def champion_rows(label: str, data: Path, what_data: str, epochs: int | None, root: Path,
                  generated: tuple[int, int, str]) -> list[dict]:
    """One champion: trained on ``data``, exported calibrated and T=1, every set scored by both; its rows."""
    import json

    from faceclf.config import MonitorConfig
    from faceclf.devtools.sample import generate_sample_faces

    cfg = MonitorConfig()
    drop_bar = cfg.accuracy_drop
    rows: list[dict] = []
    metrics, train_s = train(data, root / "run", epochs)
    calibrated, uncalibrated, temperature = export_both(root / "run", root / "models")
    test_accuracy = float(metrics["test"]["accuracy"])
    calib = metrics.get("calibration") or json.loads((root / "run" / "metrics.json").read_text()).get("calibration", {})

    test = test_split(root / "run")
    sets: dict[str, Path] = {}
    made: dict[str, str] = {}
    for name in SHIFTS:
        try:
            write_shifted(test, name, root / "sets" / name)
            sets[name] = root / "sets" / name
        except Exception as e:  # noqa: BLE001 - a set that cannot be made is reported, the rest go on
            made[name] = f"FAILED to write: {type(e).__name__}: {e}"[:200]
    per_class, size, look = generated
    try:
        generate_sample_faces(root / "sets" / "generated", per_class=per_class, size=size, seed=11, look=look)
        sets["generated"] = root / "sets" / "generated"
    except Exception as e:  # noqa: BLE001
        made["generated"] = f"FAILED to write: {type(e).__name__}: {e}"[:200]

    results: dict[str, tuple[Scored, Scored]] = {}
    for name in list(SHIFTS) + ["generated"]:
        if name in made:
            results[name] = (Scored(failed=made[name]), Scored(failed=made[name]))
            continue
        slug = name.replace(" ", "_").replace("%", "pct").replace(".", "_")
        results[name] = (score(calibrated, sets[name], root / "scores" / slug / "calibrated"),
                         score(uncalibrated, sets[name], root / "scores" / slug / "t1"))
    print(f"\n[{label}] {what_data}; fitted temperature {temperature:.4g}", flush=True)
    table(results, test_accuracy, drop_bar)

    p = f"[{label}] "
    rows.append(row(NAME, p + "champion: test accuracy", test_accuracy, "acc",
                    note=f"{what_data}; {metrics['test']['n']} test images; trained in {train_s:.0f} s "
                         f"(best epoch {metrics.get('best_epoch')})"))
    rows.append(row(NAME, p + "fitted temperature", temperature, "T",
                    note="temperature scaling fitted on the val split (1.0 exactly: the val split cannot set it, e.g. "
                         "every val image right); the T=1 model is the same checkpoint exported with temperature 1.0"))
    for split in ("val", "test"):
        block = calib.get(split)
        if block:
            rows.append(row(NAME, p + f"ECE {split}: after calibration", block["ece_after"], "ECE",
                            "before (T=1)", block["ece_before"],
                            note=f"metrics.json calibration block, {block['n']} {split} images, "
                                 f"{calib.get('bins')} bins"))

    for name, (cal, unc) in results.items():
        if cal.failed or cal.truth is None or cal.estimate is None:
            rows.append(row(NAME, p + f"set {name}: estimate", None, "acc", note=cal.short()))
            continue
        rows.append(row(NAME, p + f"{name}: estimate vs true", cal.estimate, "acc", "true accuracy",
                        cal.truth, note=f"n={cal.n}" + (f" ({cal.errors} error rows)" if cal.errors else "") +
                        f", true {cal.truth:.4f}; {cal.short()}; T=1: {unc.short()}"))

    ok = [(name, cal, unc) for name, (cal, unc) in results.items()
          if not cal.failed and cal.truth is not None and cal.estimate is not None]
    ok_unc = [(name, unc) for name, _, unc in ok if not unc.failed and unc.estimate is not None]
    if not ok:
        return rows
    def names(xs: list[str]) -> str:
        return ", ".join(xs) or "none"

    mae = statistics.mean(abs(c.estimate - c.truth) for _, c, _ in ok)
    mae_unc = statistics.mean(abs(u.estimate - u.truth) for _, u in ok_unc) if ok_unc else None
    shifted = [abs(c.estimate - c.truth) for n, c, _ in ok if n != "test"]
    signed = statistics.mean(c.estimate - c.truth for _, c, _ in ok)
    signed_unc = statistics.mean(u.estimate - u.truth for _, u in ok_unc) if ok_unc else None
    rows.append(row(NAME, p + "mean |estimate - truth| over the sets", mae, "acc", "uncalibrated (T=1)", mae_unc,
                    note=f"{len(ok)} sets (T=1: {len(ok_unc)}); shifted sets only: "
                         f"{fmt(statistics.mean(shifted) if shifted else None)}; mean signed error {signed:+.4f} "
                         f"(T=1: {fmt(signed_unc, '+.4f')})"))
    inside = [n for n, c, _ in ok if c.inside]
    inside_unc = [n for n, u in ok_unc if u.inside]
    rows.append(row(NAME, p + "sets with the truth inside the interval", len(inside), "sets",
                    "uncalibrated (T=1)", len(inside_unc),
                    note=f"of {len(ok)}: {names(inside)}; T=1: {names(inside_unc)}"))
    dropped = [n for n, c, _ in ok if test_accuracy - c.truth > drop_bar]
    bars = f"default MonitorConfig: accuracy_drop {drop_bar:g}, class_shift {cfg.class_shift:g}, " \
           f"min_images {cfg.min_images}"
    for which, pick in (("calibrated", lambda c, u: c), ("T=1", lambda c, u: u)):
        chosen = [(n, pick(c, u)) for n, c, u in ok if not pick(c, u).failed]
        for kind, fired in (("accuracy alarms", [n for n, sc in chosen if sc.accuracy_alarm]),
                            ("any alarm (accuracy or share)", [n for n, sc in chosen if sc.alarms])):
            missed = [n for n in dropped if n not in fired]
            false = [n for n in fired if n not in dropped]
            rows.append(row(NAME, p + f"{kind}, {which}", len(fired), "sets", f"true drop > {drop_bar:g}",
                            len(dropped),
                            note=f"alarm on: {names(fired)}; true drop on: {names(dropped)}; caught "
                                 f"{len(dropped) - len(missed)}, missed {len(missed)} ({names(missed)}), false alarms "
                                 f"{len(false)} ({names(false)}); exactly where accuracy dropped: "
                                 f"{'yes' if not missed and not false else 'no'} ({bars})"))
    return rows


def run(quick: bool = False) -> list[dict]:
    """Per champion: train, export calibrated and T=1, score every labelled set with both, compare with the truth."""
    import logging

    from faceclf.devtools.sample import generate_sample_faces

    logging.getLogger("faceclf").setLevel(logging.WARNING)
    logging.getLogger("faceclf.serving.stream").setLevel(logging.ERROR)  # an alarm is a warning: the table says it
    rows = machine_rows(NAME)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="faceclf-monitor-") as tmp:
        root = Path(tmp)
        if quick:
            data = root / "faces"
            generate_sample_faces(data, per_class=300, size=64, seed=3)
            what, generated = "300 generated 64 px faces per class (quick)", (40, 64, "night")
            champions = (("A", 3), ("B", 1))
        else:
            data = dataset()
            what, generated = str(data), GENERATED + ("plain",)
            champions = (("A", None), ("B", WEAK_EPOCHS))
        for label, epochs in champions:
            text = f"{what}, {'default config' if epochs is None else f'{epochs} epochs, default config otherwise'}"
            try:
                rows += champion_rows(label, data, text, epochs, root / label, generated)
            except Exception as e:  # noqa: BLE001 - the other champion's figures still count
                rows.append(row(NAME, f"[{label}] FAILED", None, note=f"{type(e).__name__}: {e}"[:300]))
    rows.append(row(NAME, "wall time", time.perf_counter() - t_start, "s",
                    note=f"both champions' training included; CPU {cpu_model()}, flags {cpu_flags()}"))
    return rows
