"""The `faceclf` command: train, evaluate, export, score, sample and demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from faceclf.config import DataConfig, ModelConfig, RunConfig, ScoreConfig, TrainConfig

log = logging.getLogger("faceclf")


class GateFailed(Exception):
    """Metrics below the asked-for minimums (exit code 1, not an error in the program)."""


def _add_gate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-accuracy", type=float, default=None, help="exit 1 if test accuracy is below this")
    p.add_argument("--min-class-accuracy", type=float, default=None, help="exit 1 if any class's test accuracy is below this")


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for every subcommand; defaults come from faceclf.config."""
    d, m, t, s = DataConfig(), ModelConfig(), TrainConfig(), ScoreConfig()
    parser = argparse.ArgumentParser(prog="faceclf", description="Train, evaluate, export and score a face-image classifier.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="train on DATA (class folders, or train/ val/ test/) into RUN")
    tr.add_argument("data", help="folder of class folders, or one holding train/ val/ test/")
    tr.add_argument("--out", required=True, help="run folder (checkpoint.pt, last.pt, history.csv, metrics.json, plots)")
    tr.add_argument("--resume", action="store_true",
                    help="continue an interrupted run from RUN/last.pt with RUN/config.json (other training flags are ignored)")
    tr.add_argument("--epochs", type=int, default=t.epochs, help="maximum epochs; early stopping usually ends sooner")
    tr.add_argument("--batch-size", type=int, default=t.batch_size)
    tr.add_argument("--lr", type=float, default=t.learning_rate, help="peak learning rate (one-cycle AdamW)")
    tr.add_argument("--weight-decay", type=float, default=t.weight_decay)
    tr.add_argument("--patience", type=int, default=t.patience, help="early stop after this many epochs without a better val loss")
    tr.add_argument("--seed", type=int, default=t.seed)
    tr.add_argument("--device", choices=("auto", "cpu", "cuda"), default=t.device)
    tr.add_argument("--no-amp", action="store_true", help="full fp32: no bf16/fp16 autocast (used on CUDA and on CPUs with native bf16)")
    tr.add_argument("--no-channels-last", action="store_true", help="keep NCHW activations instead of channels_last")
    tr.add_argument("--threads", type=int, default=t.num_threads, help="torch CPU threads (0: torch's default)")
    tr.add_argument("--image-size", type=int, default=d.image_size)
    tr.add_argument("--split", type=float, nargs=3, default=d.split_fractions, metavar=("TRAIN", "VAL", "TEST"))
    tr.add_argument("--workers", type=int, default=d.decode_workers, help="image decoding threads")
    tr.add_argument("--channels", type=int, nargs="+", default=m.conv_channels, help="conv block widths")
    tr.add_argument("--fc-hidden", type=int, default=m.fc_hidden)
    tr.add_argument("--dropout", type=float, default=m.dropout)
    tr.add_argument("--batch-norm", action="store_true", help="add batch norm after each convolution (default: the seed's plain blocks)")
    _add_gate_args(tr)

    ev = sub.add_parser("evaluate", help="evaluate a checkpoint on the test split of DATA; prints the metrics JSON")
    ev.add_argument("checkpoint")
    ev.add_argument("data")
    ev.add_argument("--split", choices=("train", "val", "test"), default="test")
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    _add_gate_args(ev)

    ex = sub.add_parser("export", help="export a checkpoint to ONNX (checked, parity-tested against torch)")
    ex.add_argument("checkpoint")
    ex.add_argument("--out", required=True, help="path of the .onnx file to write")
    ex.add_argument("--version", default=None, help="model version stored in the metadata (default: the run's)")

    sc = sub.add_parser("score", help="score images with an ONNX model into a CSV")
    sc.add_argument("model", help="model.onnx written by `faceclf export`")
    sc.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    sc.add_argument("--out", required=True, help="CSV to write: path, predicted_class, p_<class>..., error, model_version")
    sc.add_argument("--batch-size", type=int, default=s.batch_size)
    sc.add_argument("--workers", type=int, default=s.decode_workers, help="image decoding threads")
    sc.add_argument("--device", choices=("auto", "cpu", "cuda"), default=s.device)
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

    mo = sub.add_parser("models", help="the model registry: list versions, promote one (manual rollback)")
    mo_sub = mo.add_subparsers(dest="models_command", required=True)
    ml = mo_sub.add_parser("list", help="every model version, oldest first, with its gate result")
    mp = mo_sub.add_parser("promote", help="point champion.json at VERSION")
    mp.add_argument("version")
    for p in (ml, mp):
        p.add_argument("--bucket", default=None, help="bucket name, s3://BUCKET or a local folder (default: $FACECLF_BUCKET)")

    de = sub.add_parser("demo", help="train, export and score end to end on FOLDER (default: the generated sample set)")
    de.add_argument("folder", nargs="?", default=None, help="class folders to train on; omitted: a generated sample set")
    de.add_argument("--out", default="faceclf-demo", help="where the run, model and predictions go")
    de.add_argument("--epochs", type=int, default=None)
    return parser


def run_config_from_args(a: argparse.Namespace) -> RunConfig:
    """Resolve the train subcommand's flags into a RunConfig (validated by the dataclasses)."""
    return RunConfig(
        data=DataConfig(image_size=a.image_size, split_fractions=tuple(a.split), decode_workers=a.workers),
        model=ModelConfig(image_size=a.image_size, conv_channels=tuple(a.channels), fc_hidden=a.fc_hidden, dropout=a.dropout,
                          batch_norm=a.batch_norm),
        train=TrainConfig(epochs=a.epochs, batch_size=a.batch_size, learning_rate=a.lr, weight_decay=a.weight_decay,
                          patience=a.patience, seed=a.seed, device=a.device, amp=not a.no_amp, channels_last=not a.no_channels_last,
                          num_threads=a.threads),
    )


def _gate(metrics: dict[str, Any], a: argparse.Namespace) -> None:
    from faceclf.nightly.gate import gate_failures

    if a.min_accuracy is None and a.min_class_accuracy is None:
        return
    reasons = gate_failures(metrics, a.min_accuracy or 0.0, a.min_class_accuracy or 0.0)
    if reasons:
        raise GateFailed("; ".join(reasons))
    log.info("quality gate passed: accuracy %.4f >= %s, every class >= %s", metrics["accuracy"], a.min_accuracy, a.min_class_accuracy)


def cmd_train(a: argparse.Namespace) -> None:
    from faceclf.training.run import train_run

    metrics = train_run(a.data, a.out, run_config_from_args(a), resume=a.resume)
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
    print(json.dumps({"onnx": str(report.path), "version": report.version, "max_abs_diff": report.max_abs_diff,
                      "parity_images": report.batch}, indent=2))


def cmd_score(a: argparse.Namespace) -> None:
    from faceclf.serving.score import score

    s = score(a.model, a.images, a.out, ScoreConfig(batch_size=a.batch_size, decode_workers=a.workers, device=a.device),
              expected_sha256=a.sha256)
    print(f"scored {s.scored} of {s.images} images ({s.errors} errors) in {s.seconds:.2f}s: "
          f"{s.images_per_s:.1f} images/s on {s.provider}; model {s.version}; wrote {s.out}")


def cmd_sample(a: argparse.Namespace) -> None:
    from faceclf.devtools.sample import generate_sample_faces

    counts = generate_sample_faces(a.out, per_class=a.per_class, size=a.size, seed=a.seed)
    print(f"wrote {sum(counts.values())} images to {a.out}: {counts}")


def cmd_ingest(a: argparse.Namespace) -> None:
    from faceclf.dataset.ingest import ingest
    from faceclf.store.objects import open_store

    report = ingest(open_store(a.source), Path(a.dest))
    print(json.dumps(report.to_dict(), indent=2))


def cmd_models(a: argparse.Namespace) -> None:
    from faceclf.store import registry
    from faceclf.nightly.night import resolve_location
    from faceclf.store.objects import open_store

    store = open_store(resolve_location(a.bucket))
    if a.models_command == "list":
        rows = registry.list_versions(store)
        if not rows:
            print(f"no model versions in {store.uri(registry.MODELS_PREFIX)}")
        for r in rows:
            gate = {True: "passed", False: "rejected", None: "no decision"}[r["gate_passed"]]
            acc = f"{r['test_accuracy']:.4f}" if r["test_accuracy"] is not None else "n/a"
            print(f"{'*' if r['champion'] else ' '} {r['version']}  gate {gate:<8}  test accuracy {acc}"
                  f"{'' if r['has_model'] else '  (no model.onnx)'}")
    else:
        pointer = registry.promote(store, a.version)
        print(json.dumps(pointer, indent=2))


def cmd_demo(a: argparse.Namespace) -> None:
    from faceclf.devtools.demo import run_demo

    run_demo(a.folder, a.out, epochs=a.epochs)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export, "score": cmd_score,
            "sample": cmd_sample, "demo": cmd_demo, "ingest": cmd_ingest, "models": cmd_models}


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
