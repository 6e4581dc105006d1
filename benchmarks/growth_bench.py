"""Nights on a growing face set (issue 9): `python -m benchmarks --only growth [--quick]`.

For each size N (10,000, 40,000 and 100,000 generated 64 px face JPEGs; --quick: 600 and 1,200), in a
fresh temporary folder, a local bucket folder (faceclf.store.objects.LocalStore, so no S3 server limits
ingest) receives N images under incoming/<class>/ (benchmarks.s3_fixture.make_faces, half per class),
then three nights run, each in its own child process (multiprocessing, 'spawn': a fresh interpreter, so
its peak memory is its own):
  night 1   all N images are new: ingest -> nothing-new check -> decode (refresh the decoded cache)
            -> train (1 epoch from the cache) -> record latest (registry.write_latest)
  night 2   2% new images added to the bucket (half per class): the same stages
  night 3   nothing added: ingest -> nothing-new check, which ends the night (as the `train` flow does)
Stages, as library calls in the flow's order (flows/train.py):
  ingest             faceclf.dataset.ingest.ingest_in_child(bucket, face/) -> FaceSet (the flow's task: ingest in
                     a child process of its own, whose memory is counted in the night's processes)
  nothing-new check  faceclf.nightly.night.nothing_new(faceset, registry.read_latest(store), 1, False)
  decode             faceclf.nightly.night.refresh_cache(store, face/, faceset, cfg.data): pull the bucket's
                     shards, verify every shard, decode what no shard holds, mirror new shards to the bucket
  train              faceclf.training.launch.run_training(faceset, runs/<version>/, cfg, version=...,
                     cache=night.open_cache(face/, cfg.data), store=store) (what the flow's task calls) with cfg = with_overrides(RunConfig(),
                     image_size=64, epochs=1) (includes the val/test evaluation of the best checkpoint and
                     the plots). One epoch keeps a 100,000-image night within a few minutes on 2 cores.
  record latest      registry.write_latest(store, version, True, len(faceset.images), faceset.fingerprint())
Not run: the champion's re-score, the gate, export and upload (they do not depend on how many images
are new; leaving them out makes a "full night" shorter, so the nothing-new ratio is the harder to meet).
Imports (torch and faceclf, the same in every night) are timed apart and not part of a night's total.

Memory, read from /proc/<pid>/status: a thread samples, every 50 ms, RssAnon and RssFile of the night's
process, the largest RssAnon of one process of its tree (the training process; a big decode runs in a
child of its own) and the tree's sum, and keeps each stage's maximum (also at every stage's start and end). RssAnon leaves out file-backed
pages, such as the memory-mapped cache shards training reads, which count in RSS (VmRSS / VmHWM).
VmHWM (peak RSS) is read at the end of the night and, for training alone, after resetting it with
/proc/self/clear_refs just before run_training (when the kernel allows it).

Goals (issue 9): a later night decodes only its new images (night 2's decode stage at most 5% of night
1's); training's peak anonymous memory grows less than 1.2x from 10,000 to 100,000 images; a nothing-new
night costs less than 10% of a full night (night 3's total against night 1's).
"""

from __future__ import annotations

import functools
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.s3_fixture import CLASSES, make_faces, row

BENCH = "growth"
SIZES = (10_000, 40_000, 100_000)
QUICK_SIZES = (600, 1_200)
NEW_SHARE = 0.02                      # new images per later night, as a share of the first night's
EPOCHS = 1
IMAGE_SIZE = 64
SAMPLE_S = 0.05                       # RssAnon sampling period
TRAIN_STAGES = ("ingest", "nothing-new check", "decode", "train", "record latest")
NOTHING_NEW_STAGES = ("ingest", "nothing-new check")
DECODE_GOAL, MEMORY_GOAL, NOTHING_NEW_GOAL = 0.05, 1.2, 0.10
_STATUS = re.compile(r"^(VmHWM|VmRSS|RssAnon|RssFile|RssShmem):\s+(\d+)\s+kB", re.MULTILINE)


# ---------------------------------------------------------------------------------------------
# In the child process
# ---------------------------------------------------------------------------------------------
def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of a process (default this one), in bytes (empty off Linux
    or once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v) * 1024 for k, v in _STATUS.findall(text)}


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tree_anon() -> tuple[int, int]:
    """(largest RssAnon of one process, RssAnon summed) over this process and its descendants: a stage
    that runs in a child process (training, a big decode) counts there, and the night's total with it."""
    import psutil

    anon = [proc_status().get("RssAnon", 0)]
    for kid in psutil.Process().children(recursive=True):
        anon.append(proc_status(kid.pid).get("RssAnon", 0))
    return max(anon), sum(anon)


class MemorySampler(threading.Thread):
    """Samples, every ``period`` seconds, RssAnon and RssFile of this process, the largest RssAnon of one
    process of its tree (``ProcAnon``: the training process, wherever it runs) and the tree's sum
    (``TreeAnon``), and keeps the maximum of each per stage."""

    def __init__(self, period: float = SAMPLE_S):
        super().__init__(daemon=True, name="rss-sampler")
        self.period, self.stage = period, "start"
        self.peak: dict[str, dict[str, int]] = {}
        self._lock, self._halt = threading.Lock(), threading.Event()

    def sample(self) -> None:
        """Read the process tree once and count it in the stage that was running when the reading began (a
        reading taken late in one stage, while its child process still ran, must not land in the next)."""
        with self._lock:
            stage = self.stage
        s = proc_status()
        s["ProcAnon"], s["TreeAnon"] = tree_anon()
        with self._lock:
            mine = self.peak.setdefault(stage, {"RssAnon": 0, "RssFile": 0, "ProcAnon": 0, "TreeAnon": 0})
            for key in mine:
                mine[key] = max(mine[key], s.get(key, 0))

    def enter(self, stage: str) -> None:
        self.sample()          # the end of the stage before
        with self._lock:
            self.stage = stage
        self.sample()          # the start of this one

    def run(self) -> None:
        while not self._halt.wait(self.period):
            self.sample()

    def stop(self) -> None:
        self.sample()
        self._halt.set()
        self.join()


def _time_calls(owner: Any, name: str, label: str, into: dict[str, float]) -> None:
    """Replace ``owner.name`` by a wrapper adding its wall seconds to ``into[label]`` (in this child only)."""
    orig: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(orig)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            into[label] = into.get(label, 0.0) + time.perf_counter() - t0

    setattr(owner, name, timed)


def night_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One night in this (fresh) process; returns seconds per stage, memory peaks and what each stage did.

    ``spec``: bucket, face, runs (folders), night (1, 2 or 3), epochs. Nights 1 and 2 must find something
    new and train; night 3 must end at the nothing-new check (RuntimeError otherwise).
    """
    import logging

    sampler = MemorySampler()
    sampler.start()
    secs: dict[str, float] = {}
    sub: dict[str, float] = {}         # parts of stages, timed by wrapping library functions
    facts: dict[str, Any] = {"night": spec["night"]}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        sampler.enter(name)
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            secs[name] = time.perf_counter() - t0
            sampler.enter("between stages")

    t0 = time.perf_counter()
    sampler.enter("imports")
    import faceclf.dataset.ingest as ingest_mod
    import faceclf.training.launch as launch_mod
    import faceclf.training.run as run_mod
    from faceclf.config import RunConfig, with_overrides
    from faceclf.dataset.cache import DecodedCache
    from faceclf.nightly import night
    from faceclf.store.objects import LocalStore
    from faceclf.store.registry import read_latest, write_latest
    from faceclf.training.fit import new_version
    facts["imports_s"] = time.perf_counter() - t0
    sampler.enter("between stages")
    logging.getLogger("faceclf").setLevel(logging.WARNING)

    for method in ("pull", "verify", "add", "push"):
        _time_calls(DecodedCache, method, f"decode: {method}", sub)
    _time_calls(run_mod, "load_splits", "train: open splits", sub)
    _time_calls(run_mod, "fit", "train: fit", sub)
    _time_calls(run_mod, "finish_run", "train: val+test eval", sub)

    store, face = LocalStore(spec["bucket"]), Path(spec["face"])
    cfg = with_overrides(RunConfig(), image_size=IMAGE_SIZE, epochs=spec["epochs"])

    report = stage("ingest", lambda: ingest_mod.ingest_in_child(spec["bucket"], face))
    faceset = report.faceset
    facts.update(listed=report.listed, new=report.new, skipped=report.skipped, images=len(faceset.images),
                 quarantined=report.quarantined, duplicates=report.duplicates, failed=report.failed)
    reason = stage("nothing-new check", lambda: night.nothing_new(faceset, read_latest(store), 1, False))
    facts["nothing_new"] = reason
    if spec["night"] == 3 or reason:
        if spec["night"] != 3 or not reason:
            raise RuntimeError(f"night {spec['night']}: nothing-new check gave {reason!r} after ingest of "
                               f"{report.new} new image(s)")
    else:
        cache_report = stage("decode", lambda: night.refresh_cache(store, face, faceset, cfg.data))
        facts.update(decoded=cache_report.decoded, shards=cache_report.shards, cached=cache_report.images,
                     uploaded=cache_report.uploaded, downloaded=cache_report.downloaded,
                     rebuilt=len(cache_report.rebuilt), rejected=len(cache_report.rejected))
        version = new_version()
        facts["train_hwm_reset"] = reset_peak_rss()
        metrics = stage("train", lambda: launch_mod.run_training(faceset, Path(spec["runs"]) / version, cfg, version=version,
                                                          cache=night.open_cache(face, cfg.data), store=store))
        facts["train_vmhwm"] = proc_status().get("VmHWM") if facts["train_hwm_reset"] else None
        facts.update(split_counts=metrics["data"]["counts"], test_accuracy=metrics["test"]["accuracy"],
                     device=metrics["device"])
        stage("record latest", lambda: write_latest(store, version, True, len(faceset.images), faceset.fingerprint()))
    sampler.stop()
    end = proc_status()
    return {"secs": secs, "sub": sub, "facts": facts, "peaks": sampler.peak,
            "vmhwm": end.get("VmHWM"), "end_status": end}


# ---------------------------------------------------------------------------------------------
# In the parent
# ---------------------------------------------------------------------------------------------
def _child_main(conn: Any, spec: dict[str, Any]) -> None:
    """The child's entry point: send ("ok", result) or ("error", traceback) back through ``conn``."""
    import traceback

    try:
        conn.send(("ok", night_child(spec)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def in_child(spec: dict[str, Any]) -> dict[str, Any]:
    """``night_child(spec)`` in a fresh spawned process; adds its wall time as the parent saw it."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    t0 = time.perf_counter()
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(send, spec), name=f"growth-night-{spec['night']}")
    child.start()
    send.close()
    try:
        status, out = receive.recv()
    except EOFError:
        status, out = "error", "the child process ended without a result"
    finally:
        receive.close()
        child.join()
    if status != "ok":
        raise RuntimeError(f"night {spec['night']} failed (exit code {child.exitcode}):\n{out}")
    out["child_wall_s"] = time.perf_counter() - t0
    return out


def put_faces(bucket: Path, faces: list[tuple[str, str, bytes]]) -> None:
    """Write each face as bucket/incoming/<class>/<name> (the local bucket's layout)."""
    for cls in {c for c, _, _ in faces}:
        (bucket / "incoming" / cls).mkdir(parents=True, exist_ok=True)
    for cls, name, data in faces:
        (bucket / "incoming" / cls / name).write_bytes(data)


def _mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def _stage_note(res: dict[str, Any], name: str) -> str:
    parts = [f"{k.split(': ', 1)[1]} {v:.2f} s" for k, v in res["sub"].items() if k.startswith(name.split()[0] + ":")]
    total = sum(res["secs"].values())
    share = f"{100 * res['secs'][name] / total:.0f}% of the night" if total else ""
    return "; ".join(p for p in (share, ", ".join(parts)) if p)


def _night_summary(res: dict[str, Any]) -> str:
    f = res["facts"]
    bits = [f"{' + '.join(f'{k} {v:.2f}' for k, v in res['secs'].items())} s",
            f"ingest: listed {f['listed']}, new {f['new']}, skipped {f['skipped']}; FaceSet {f['images']} images"]
    if "decoded" in f:
        bits.append(f"decoded {f['decoded']}, cache {f['cached']} images in {f['shards']} shards, uploaded "
                    f"{f['uploaded']} shard(s)")
        c = f["split_counts"]
        bits.append(f"train/val/test {c['train']}/{c['val']}/{c['test']}, test acc {f['test_accuracy']:.3f}, "
                    f"{f['device']}")
    if f.get("nothing_new"):
        bits.append(f["nothing_new"].split(";")[0])
    bits.append(f"child process {res['child_wall_s']:.1f} s incl. start and imports {f['imports_s']:.1f} s; "
                f"VmHWM of the night {_mib(res['vmhwm']):.0f} MiB")
    return "; ".join(bits)


def measure_size(n: int, epochs: int, workdir: str | None) -> dict[str, Any]:
    """Three nights on ``n`` images (+2% on night 2) in a fresh temporary folder."""
    if n % len(CLASSES):
        raise ValueError(f"n must split evenly over {len(CLASSES)} classes, got {n}")
    new_per_class = max(1, round(n * NEW_SHARE / len(CLASSES)))
    per_class = n // len(CLASSES)
    with tempfile.TemporaryDirectory(prefix="faceclf-growth-bench-", dir=workdir) as tmp:
        root = Path(tmp)
        bucket = root / "bucket"
        spec = {"bucket": str(bucket), "face": str(root / "face"), "runs": str(root / "runs"), "epochs": epochs}
        t0 = time.perf_counter()
        faces = make_faces(n + new_per_class * len(CLASSES), size=IMAGE_SIZE,
                           base_per_class=min(500, per_class + new_per_class))
        by_class: dict[str, list[tuple[str, str, bytes]]] = {}
        for face in faces:
            by_class.setdefault(face[0], []).append(face)
        first = [f for fs in by_class.values() for f in fs[:per_class]]
        later = [f for fs in by_class.values() for f in fs[per_class:]]
        del faces, by_class
        put_faces(bucket, first)
        print(f"growth: {n:,} images: {len(first):,} generated + {len(later):,} for night 2 and written to the "
              f"local bucket in {time.perf_counter() - t0:.1f} s", flush=True)
        del first
        out: dict[str, Any] = {"n": n, "new": len(later)}
        for k in (1, 2, 3):
            if k == 2:
                put_faces(bucket, later)
            res = in_child({**spec, "night": k})
            out[k] = res
            train = res["peaks"].get("train", {})
            print(f"growth: {n:,} images: night {k} {sum(res['secs'].values()):.1f} s "
                  f"({', '.join(f'{s} {v:.1f}' for s, v in res['secs'].items())}); "
                  + (f"peak RssAnon in training: the training process {_mib(train['ProcAnon']):.0f} MiB, the "
                     f"night's processes {_mib(train['TreeAnon']):.0f} MiB; " if train else "")
                  + f"VmHWM {_mib(res['vmhwm']):.0f} MiB", flush=True)
    return out


def _verdict(value: float | None, goal: float, strict: bool) -> str:
    if value is None:
        return "not measured"
    ok = value < goal if strict else value <= goal
    return "met" if ok else "NOT met"


def rows_for(size: dict[str, Any], epochs: int) -> list[dict]:
    n, r1, r2, r3 = size["n"], size[1], size[2], size[3]
    head = f"{n:,} imgs"
    rows = []
    for k, res, stages in ((1, r1, TRAIN_STAGES), (2, r2, TRAIN_STAGES)):
        for name in stages:
            rows.append(row(BENCH, f"{head}, night {k}: {name}", res["secs"][name], "s", note=_stage_note(res, name)))
        rows.append(row(BENCH, f"{head}, night {k}: total ({epochs} epoch)", sum(res["secs"].values()), "s",
                        note=_night_summary(res)))
    d1, d2 = r1["secs"]["decode"], r2["secs"]["decode"]
    ratio = d2 / d1 if d1 else None
    rows.append(row(BENCH, f"{head}: decode, night 2 / night 1", d2, "s", "night 1 decode", d1,
                    note=f"goal <= {DECODE_GOAL}: {_verdict(ratio, DECODE_GOAL, strict=False)}; decoded "
                         f"{r2['facts']['decoded']} (night 2, {size['new']} new) vs {r1['facts']['decoded']}; "
                         f"night 2: {_stage_note(r2, 'decode')}"))
    t1, t2, t3 = (sum(r["secs"].values()) for r in (r1, r2, r3))
    ratio3 = t3 / t1 if t1 else None
    rows.append(row(BENCH, f"{head}: nothing-new night (night 3)", t3, "s", "night 1 total", t1,
                    note=f"goal < {NOTHING_NEW_GOAL}: {_verdict(ratio3, NOTHING_NEW_GOAL, strict=True)}; "
                         f"{t3 / t2:.3f} of night 2; ingest {r3['secs']['ingest']:.2f} s "
                         f"({_stage_note(r3, 'ingest').split('; ', 1)[-1]}), check "
                         f"{r3['secs']['nothing-new check']:.3f} s; {r3['facts']['nothing_new'].split(';')[0]}; "
                         f"VmHWM {_mib(r3['vmhwm']):.0f} MiB"))
    for k, res in ((1, r1), (2, r2)):
        peak = res["peaks"].get("train", {})
        hwm = res["facts"].get("train_vmhwm")
        rows.append(row(BENCH, f"{head}, night {k}: training peak RssAnon", _mib(peak.get("ProcAnon")), "MiB",
                        note=f"the training process, sampled every {SAMPLE_S * 1000:.0f} ms; all the night's "
                             f"processes together {_mib(peak.get('TreeAnon')):.0f} MiB; the night process's RssFile "
                             f"up to {_mib(peak.get('RssFile')):.0f} MiB (memory-mapped shards, libraries); peak RSS "
                             f"(VmHWM) of the night process in training "
                             + (f"{_mib(hwm):.0f} MiB" if hwm else "not measured (clear_refs refused)")
                             + f", of the whole night {_mib(res['vmhwm']):.0f} MiB; peak RssAnon of the night "
                             "process by stage: "
                             + ", ".join(f"{s} {_mib(p['RssAnon']):.0f}" for s, p in res["peaks"].items()
                                         if s not in ("start", "between stages"))))
    return rows


def training_peak(size: dict[str, Any], nights: tuple[int, ...] = (1, 2), key: str = "ProcAnon") -> float:
    """Peak RssAnon during training, the largest of ``nights``, in bytes: of the training process
    (``ProcAnon``) or of all the night's processes together (``TreeAnon``)."""
    return max(size[k]["peaks"].get("train", {}).get(key, 0) for k in nights)


def ratio_row(results: list[dict[str, Any]], what: str, nights: tuple[int, ...], key: str, goal: bool) -> dict:
    """One row: the training peak at the largest size against the smallest (``goal``: judged against 1.2x)."""
    lo, hi = results[0], results[-1]
    p_lo, p_hi = training_peak(lo, nights, key), training_peak(hi, nights, key)
    ratio = p_hi / p_lo if p_lo else None
    verdict = (f"goal < {MEMORY_GOAL} (from 10,000 to 100,000 images): {_verdict(ratio, MEMORY_GOAL, strict=True)}"
               + ("" if (lo["n"], hi["n"]) == (10_000, 100_000) else " (sizes of this run differ)") + "; "
               if goal else "")
    return row(BENCH, f"{what}, {hi['n']:,} / {lo['n']:,} imgs", _mib(p_hi), "MiB", f"at {lo['n']:,} images",
               _mib(p_lo), note=verdict + f"night{'s' if len(nights) > 1 else ''} {' and '.join(map(str, nights))}, the larger at each size; by "
               "size: " + ", ".join(f"{s['n']:,}: {_mib(training_peak(s, nights, key)):.0f} MiB" for s in results))


def run(quick: bool = False, sizes: tuple[int, ...] | None = None, epochs: int = EPOCHS,
        workdir: str | None = None) -> list[dict]:
    """Rows per size: seconds per stage of nights 1 and 2 (and their totals), night 2's decode against
    night 1's, the nothing-new night against night 1, peak RssAnon during training; then the training
    peak at the largest size against the smallest (the training process alone, and all the night's
    processes together). ``workdir``: where the temporary folders go."""
    sizes = tuple(sizes or (QUICK_SIZES if quick else SIZES))
    print(f"growth: sizes {', '.join(f'{n:,}' for n in sizes)}; {IMAGE_SIZE} px, {NEW_SHARE:.0%} new on night 2, "
          f"{epochs} epoch(s); each night in its own process", flush=True)
    results = [measure_size(n, epochs, workdir) for n in sizes]
    rows = [r for size in results for r in rows_for(size, epochs)]
    rows.append(ratio_row(results, "peak RssAnon of the training process", (1, 2), "ProcAnon", goal=True))
    rows.append(ratio_row(results, "peak RssAnon of the night's processes in training", (1, 2), "TreeAnon",
                          goal=False))
    return rows


if __name__ == "__main__":  # same as: python -m benchmarks --only growth [--quick], once registered there
    from benchmarks.__main__ import MODULES, main, print_rows

    if "growth" in MODULES:
        raise SystemExit(main(["--only", "growth", *sys.argv[1:]]))
    print_rows(run(quick="--quick" in sys.argv[1:]))
