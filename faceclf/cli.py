"""The `faceclf` command: train, evaluate, export, score, sample and demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from faceclf.config import (
    DEVICES,
    is_option,
    option_flag,
    DataConfig,
    IngestConfig,
    Int8Config,
    ModelConfig,
    MonitorConfig,
    NightConfig,
    RunConfig,
    ScoreConfig,
    TrainConfig,
    with_overrides,
)
from faceclf.devtools.demo import DemoConfig

log = logging.getLogger("faceclf")


class GateFailed(Exception):
    """Metrics below the asked-for minimums (exit code 1, not an error in the program)."""


def _add_gate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-accuracy", type=float, default=None, help="exit 1 if test accuracy is below this")
    p.add_argument("--min-class-accuracy", type=float, default=None, help="exit 1 if any class's test accuracy is below this")


def add_config_options(p: argparse.ArgumentParser, config: type) -> list[str]:
    """Add a --flag for every field of the dataclass ``config`` declared with ``faceclf.config.option``;
    returns the field names (the argparse destinations). Defaults and help come from the field itself.

    A bool that defaults to True becomes --no-<name>; one that defaults to False, --<name>; a tuple
    takes as many values as its default has (or one or more, for a variable-length tuple).
    """
    names = []
    for f in dataclasses.fields(config):
        flag = option_flag(f)
        if flag is None:
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if isinstance(f.default, bool):
            kwargs["help"] = ("turn off: " if f.default else "") + kwargs["help"]
            kwargs.update(action="store_false" if f.default else "store_true")
        elif isinstance(f.default, tuple):
            fixed = "..." not in str(f.type)
            kwargs.update(type=type(f.default[0]), nargs=len(f.default) if fixed else "+", default=f.default)
        else:
            kwargs.update(type=f.metadata["parse"] or (type(f.default) if f.default is not None else str),
                          default=f.default, choices=f.metadata["choices"])
        if "default" in kwargs and not isinstance(f.default, bool) and f.default is not None:
            kwargs["help"] += f" (default: {' '.join(map(str, f.default)) if isinstance(f.default, tuple) else f.default})"
        p.add_argument(flag, **kwargs)
        names.append(f.name)
    return names


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for every subcommand; options and defaults come from faceclf.config's dataclasses."""
    parser = argparse.ArgumentParser(prog="faceclf", description="Train, evaluate, export and score a face-image classifier.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train on DATA (class folders, or train/ val/ test/) into RUN")
    tr.add_argument("data", help="folder of class folders, or one holding train/ val/ test/")
    tr.add_argument("--out", required=True, help="run folder (checkpoint.pt, last.pt, history.csv, metrics.json, plots)")
    tr.add_argument("--resume", action="store_true",
                    help="continue an interrupted run from RUN/last.pt with RUN/config.json (other training flags are ignored)")
    tr.add_argument("--config", default=None, metavar="RUN/config.json",
                    help="replay a run: train with the resolved config an earlier run saved (its image size, device, "
                         "workers, class weighting...); training flags cannot be given with it")
    for config in (TrainConfig, DataConfig, ModelConfig):
        add_config_options(tr, config)
    tr.add_argument("--bucket", default=None, help="registry of --init-from VERSION: bucket name, s3://BUCKET or a "
                    "local folder (default: $FACECLF_BUCKET)")
    _add_gate_args(tr)

    ev = sub.add_parser("evaluate", help="evaluate a checkpoint on the test split of DATA; prints the metrics JSON")
    ev.add_argument("checkpoint")
    ev.add_argument("data")
    ev.add_argument("--split", choices=("train", "val", "test"), default="test")
    ev.add_argument("--device", choices=DEVICES, default="auto")
    _add_gate_args(ev)

    ex = sub.add_parser("export", help="export a checkpoint to ONNX (checked, parity-tested against torch)")
    ex.add_argument("checkpoint")
    ex.add_argument("--out", required=True, help="path of the .onnx file to write")
    ex.add_argument("--version", default=None, help="model version stored in the metadata (default: the run's)")
    ex.add_argument("--int8", action="store_true", help="also write OUT's .int8.onnx: static int8 quantization "
                    "calibrated on the run's validation images, refused unless it agrees with fp32 (see --min-agreement)")
    ex.add_argument("--calibration", default=None, help="with --int8: a folder of images to calibrate on instead of "
                    "the val images listed in splits.csv beside the checkpoint")
    add_config_options(ex, Int8Config)

    sc = sub.add_parser("score", help="score images with an ONNX model into a CSV, streamed; a killed run resumes")
    sc.add_argument("model", help="model.onnx written by `faceclf export`")
    sc.add_argument("images", nargs="+", help="image files and/or folders (searched recursively, links followed), "
                                              "or one s3://BUCKET/PREFIX/")
    sc.add_argument("--out", required=True, help="FILE.csv, a folder or s3://BUCKET/PREFIX/ (-> predictions.csv): "
                                                 "path, predicted_class, p_<class>..., error, model_version, etag")
    sc.add_argument("--incremental", action="store_true",
                    help="keep the rows of --out whose (path, etag, model version) still match; score the rest")
    add_config_options(sc, ScoreConfig)
    add_config_options(sc, MonitorConfig)
    sc.add_argument("--sha256", default=None, metavar="HEX",
                    help="refuse the model unless its sha256 is HEX (e.g. champion.json's model_sha256)")

    sa = sub.add_parser("sample", help="write the procedural sample face set to OUT/<class>/")
    sa.add_argument("out")
    sa.add_argument("--per-class", type=int, default=150)
    sa.add_argument("--size", type=int, default=128)
    sa.add_argument("--seed", type=int, default=0)

    ing = sub.add_parser("ingest", help="ingest SOURCE/incoming/<class>/* into DEST/{train,val,test}/<class>/; prints the summary JSON")
    ing.add_argument("source", help="s3://BUCKET, or a local folder with the same layout (incoming/<class>/...)")
    ing.add_argument("dest", help="local ImageFolder root, e.g. face/")
    add_config_options(ing, IngestConfig)

    rs = sub.add_parser("resplit", help="move near-duplicates that straddle train/val/test (twins of train images "
                        "leave test for train), re-score the champion, record it in champion.json's history")
    rs.add_argument("source", help="s3://BUCKET, or a local folder with the bucket layout")
    rs.add_argument("dest", help="the local ImageFolder root ingest writes, e.g. face/")
    rs.add_argument("--dry-run", action="store_true", help="say what would move; move nothing")
    add_config_options(rs, IngestConfig)

    mo = sub.add_parser("models", help="the model registry: list versions, promote one (manual rollback)")
    mo_sub = mo.add_subparsers(dest="models_command", required=True)
    ml = mo_sub.add_parser("list", help="every model version, oldest first, with its gate result")
    mp = mo_sub.add_parser("promote", help="point champion.json at VERSION (recorded in its history: why, by whom)")
    mp.add_argument("version")
    mp.add_argument("--reason", required=True, help="why, in a sentence: kept in champion.json's history with who ran it")
    for p in (ml, mp):
        p.add_argument("--bucket", default=None, help="bucket name, s3://BUCKET or a local folder (default: $FACECLF_BUCKET)")

    de = sub.add_parser("demo", help="train, export and score end to end on FOLDER (default: the generated sample set)")
    de.add_argument("folder", nargs="?", default=None, help="class folders to train on; omitted: a generated sample set")
    add_config_options(de, DemoConfig)
    return parser


def run_config_from_args(a: argparse.Namespace) -> RunConfig:
    """Resolve the train subcommand's options into a RunConfig (validated by the dataclasses); with --config, the
    saved config of that file, and a ValueError naming any training option also given (it would be ignored)."""
    fields = {f.name: f for c in (DataConfig, ModelConfig, TrainConfig) for f in dataclasses.fields(c) if is_option(f)}
    if a.config is None:
        return with_overrides(RunConfig(), **{n: getattr(a, n) for n in fields})
    given = sorted(n for n, f in fields.items() if getattr(a, n) != f.default)
    if given:
        raise ValueError(f"--config {a.config} holds the whole training config: leave out "
                         + ", ".join("--" + n.replace("_", "-") for n in given) + " (or edit a copy of the file)")
    return load_config(a.config)


def load_config(path: str | Path) -> RunConfig:
    """The RunConfig saved in ``path`` (a run's config.json); errors that name the file."""
    path = Path(path)
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such file (a run folder's config.json)") from None
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"--config {path} is not a faceclf run config: {err}") from None


def config_from_args(config: type, a: argparse.Namespace) -> Any:
    """An instance of ``config`` with the options ``add_config_options`` added, as parsed."""
    return config(**{f.name: getattr(a, f.name) for f in dataclasses.fields(config) if is_option(f)})


def _gate(metrics: dict[str, Any], a: argparse.Namespace) -> None:
    from faceclf.nightly.gate import gate_failures

    if a.min_accuracy is None and a.min_class_accuracy is None:
        return
    reasons = gate_failures(metrics, a.min_accuracy or 0.0, a.min_class_accuracy or 0.0)
    if reasons:
        raise GateFailed("; ".join(reasons))
    log.info("quality gate passed: accuracy %.4f >= %s, every class >= %s", metrics["accuracy"], a.min_accuracy, a.min_class_accuracy)


def cmd_train(a: argparse.Namespace) -> None:
    from faceclf.training.launch import run_training

    cfg = run_config_from_args(a)
    store = None
    if cfg.training.init_from and not Path(cfg.training.init_from).is_file() and (a.bucket or os.environ.get("FACECLF_BUCKET")):
        from faceclf.store.objects import resolve_location
        from faceclf.store.objects import open_store

        store = open_store(resolve_location(a.bucket))
    metrics = run_training(a.data, a.out, cfg, resume=a.resume, store=store)
    print(json.dumps({"run": str(Path(a.out)), "best_epoch": metrics["best_epoch"], "device": metrics["device"],
                      "test": metrics["test"]}, indent=2))
    _gate(metrics["test"], a)


def cmd_evaluate(a: argparse.Namespace) -> None:
    from faceclf.training.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(a.checkpoint, a.data, a.split, a.device)
    print(json.dumps(metrics, indent=2))
    _gate(metrics, a)


def cmd_export(a: argparse.Namespace) -> None:
    from faceclf.serving.export import export_onnx

    report = export_onnx(a.checkpoint, a.out, version=a.version)
    out: dict[str, Any] = {"onnx": str(report.path), "version": report.version, "max_abs_diff": report.max_abs_diff,
                           "parity_images": report.batch}
    if a.int8:
        from faceclf.serving.quantize import export_int8

        q = export_int8(a.checkpoint, report.path, config_from_args(Int8Config, a), a.calibration)
        out["int8"] = {"onnx": str(q.path), "images": q.images, "agreement": q.agreement,
                       "max_prob_diff": q.max_prob_diff, "fp32_images_per_s": round(q.fp32_img_s, 1),
                       "int8_images_per_s": round(q.int8_img_s, 1), "speedup": round(q.speedup, 3)}
    print(json.dumps(out, indent=2))


def cmd_score(a: argparse.Namespace) -> None:
    from faceclf.serving.monitor import brief
    from faceclf.serving.stream import score_images

    s = score_images(a.model, a.images, a.out, config_from_args(ScoreConfig, a), expected_sha256=a.sha256,
              incremental=a.incremental, monitor=config_from_args(MonitorConfig, a))
    kept = (f"; {s.reused} kept from the previous run" if s.reused else "") + (
        f"; {s.resumed} from the killed run resumed" if s.resumed else "")
    print(f"scored {s.scored} of {s.images} images ({s.errors} errors{kept}) in {s.seconds:.2f}s: "
          f"{s.images_per_s:.1f} images/s on {s.provider}; model {s.version}; wrote {s.out}; "
          f"{brief(s.monitor) if s.monitor else 'no accuracy estimate'}")


def estimate_text(estimate: dict[str, Any] | None) -> str:
    """A version's last label-free estimate in `faceclf models list`: '  estimated 0.9312 [0.9108, 0.9516] on
    1234 images at 2026-12-07T09:12:00Z' (ALARM when it had alarms); "" without one."""
    if not estimate:
        return ""
    if estimate["estimated_accuracy"] is None:
        return f"  estimated n/a (no scored images at {estimate['scored_at']})"
    low, high = estimate["interval"]
    return (f"  estimated {estimate['estimated_accuracy']:.4f} [{low:.4f}, {high:.4f}] on {estimate['n']} images at "
            f"{estimate['scored_at']}" + (f"  ALARM ({len(estimate['alarms'])})" if estimate["alarms"] else ""))


def cmd_sample(a: argparse.Namespace) -> None:
    from faceclf.devtools.sample import generate_sample_faces

    counts = generate_sample_faces(a.out, per_class=a.per_class, size=a.size, seed=a.seed)
    print(f"wrote {sum(counts.values())} images to {a.out}: {counts}")


def cmd_ingest(a: argparse.Namespace) -> None:
    from faceclf.dataset.ingest import ingest
    from faceclf.store.objects import open_store

    from faceclf.nightly.lock import bucket_lease

    store = open_store(a.source)
    with bucket_lease(store, "faceclf ingest"):  # never while a night (or another ingest) writes the manifest
        report = ingest(store, Path(a.dest), config_from_args(IngestConfig, a))
    print(json.dumps(report.to_dict(), indent=2))


def cmd_resplit(a: argparse.Namespace) -> None:
    from faceclf.dataset.resplit import resplit
    from faceclf.nightly.lock import bucket_lease
    from faceclf.store.objects import open_store

    store = open_store(a.source)
    with bucket_lease(store, "faceclf resplit"):  # never while a night (or an ingest) reads or writes the manifest
        report = resplit(store, Path(a.dest), config_from_args(IngestConfig, a), dry_run=a.dry_run)
    print(report.summary())
    print(json.dumps(dataclasses.asdict(report), indent=2))


def cmd_models(a: argparse.Namespace) -> None:
    from faceclf.store.objects import resolve_location
    from faceclf.nightly.stuck import stuck_reasons
    from faceclf.store import registry
    from faceclf.store.objects import open_store

    store = open_store(resolve_location(a.bucket))
    if a.models_command == "list":
        rows = registry.list_versions(store)
        if not rows:
            print(f"no model versions in {store.uri(registry.MODELS_PREFIX)}")
        for r in rows:
            gate = {True: "passed", False: "rejected", None: "no decision"}[r["gate_passed"]]
            acc = f"{r['test_accuracy']:.4f}" if r["test_accuracy"] is not None else "n/a"
            if r["test_low"] is not None:
                acc += f" [{r['test_low']:.4f}, {r['test_high']:.4f}] n={r['test_n']}"
            print(f"{'*' if r['champion'] else ' '} {r['version']}  gate {gate:<8}  "
                  f"{'promoted    ' if r['promoted'] else 'not promoted'}  test accuracy {acc}"
                  f"{estimate_text(r.get('estimate'))}{'' if r['has_model'] else '  (no model.onnx)'}")
        print("* champion; test accuracy with its Wilson 95% interval and the number of test images; estimated: "
              "the last scoring run's label-free accuracy estimate (95% interval) and when it scored")
        champion = registry.read_champion(store)
        for reason in stuck_reasons(rows, champion["version"] if champion else None, NightConfig().stuck_after):
            print(f"STUCK: {reason}")
        latest = registry.read_latest(store)
        if latest:  # what the next night compares with: fewer new images than min_new_images and it is skipped
            print(f"latest: {latest['version']}, trained on {latest['images']} images; a night with fewer new "
                  "images than min_new_images (default 1) ends after ingest: nothing new")
    else:
        from faceclf.nightly.lock import bucket_lease

        with bucket_lease(store, f"models promote {a.version}"):  # never while a night runs on this bucket
            pointer = registry.promote(store, a.version, a.reason)
        print(json.dumps(pointer, indent=2))


def cmd_demo(a: argparse.Namespace) -> None:
    from faceclf.devtools.demo import run_demo

    try:
        run_demo(a.folder, config_from_args(DemoConfig, a))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM during the night: the services are stopped by then
        print("faceclf demo: interrupted; the local services are stopped", file=sys.stderr)
        raise SystemExit(130) from None


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export, "score": cmd_score,
            "sample": cmd_sample, "demo": cmd_demo, "ingest": cmd_ingest, "resplit": cmd_resplit,
            "models": cmd_models}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code (0 ok, 1 gate failed, 2 error)."""
    a = build_parser().parse_args(argv)
    # Our own INFO lines; other libraries (onnxscript's optimiser is chatty) only at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.WARNING if a.quiet else logging.INFO)
    debug = a.debug or os.environ.get("FACECLF_DEBUG") == "1"
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():
            COMMANDS[a.command](a)
    except GateFailed as e:
        print(f"faceclf: quality gate failed: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        if debug:
            raise
        print(f"faceclf {a.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
