"""Configuration dataclasses, one per concern, with every default in one commented block.

The resolved configuration of a run is saved next to its outputs (RUN/config.json) and travels
inside the checkpoint, so a model can always be rebuilt from its own file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

# ---------------------------------------------------------------------------------------------
# Defaults, in one place.
# ---------------------------------------------------------------------------------------------
IMAGE_SIZE = "auto"                   # square side fed to the CNN (every image is resized once): "auto" is the
                                      # smaller of AUTO_MAX_SIZE and the train images' median short side; on 64 px
                                      # faces it matched 96 px's accuracy in 0.44x the time (README); face-mask: 96
AUTO_MAX_SIZE = 96                    # "auto" never upsamples past this; also the model's size before data sets it
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)     # train / val / test share of the content-hash space
NEAR_DISTANCE = 4                     # images whose 64-bit pHashes differ in at most this many bits are twins (an
                                      # augmented copy: noise, resize, small rotation, re-encode): a new image joins
                                      # its nearest placed twin's split (faceclf.dataset.placement). Chosen by
                                      # `python3 -m benchmarks --only neardup` (README); 0: exact pHash matches only
MEAN = (0.485, 0.456, 0.406)          # per-channel normalisation (ImageNet statistics)
STD = (0.229, 0.224, 0.225)
MAX_ROTATION_DEG = 10.0               # training-only augmentation: rotation in [-10, 10] degrees
HFLIP_PROB = 0.5                      # training-only augmentation: horizontal flip probability
CONV_CHANNELS = (16, 32, 64, 128)     # one conv+ReLU+maxpool block per entry (each halves H, W)
FC_HIDDEN = 128                       # width of the hidden fully connected layer
DROPOUT = 0.3                         # dropout before each fully connected layer
BATCH_NORM = False                    # the seed's plain conv+ReLU+pool block; True adds batch norm
EPOCHS = 15                           # upper bound; early stopping usually ends sooner
BATCH_SIZE = 64
LEARNING_RATE = 2e-3                  # AdamW peak learning rate (one-cycle schedule)
WEIGHT_DECAY = 1e-4
PATIENCE = 6                          # epochs without a better val loss before stopping
SEED = 0                              # makes a CPU run repeatable
CLASS_WEIGHTINGS = ("auto", "none", "balanced")  # training loss weights per class (balanced: n / (k * n_class))
CLASS_WEIGHTING = "auto"              # balanced when the train split is imbalanced, else none. `python3 -m
                                      # benchmarks --only imbalance` (2026-11-25): face-mask with without_mask train
                                      # cut to 1 in 10, seeds 0-2: minority test accuracy 0.944 / 0.944 / 0.963
                                      # balanced vs 0.926 / 0.000 (collapsed) / 0.926 none; at 1 in 4 and on the
                                      # full set within one test image either way (seed noise, which on the demo's
                                      # 300 faces made balanced lose 5 of 30 test images): so weights only where
                                      # they were measured to help
WORKERS = 1                           # training processes (DDP ranks): > 1 runs torchrun's launcher on this machine
                                      # (one per GPU; on CPUs each gets its share of the cores), or that many Ray
                                      # Train workers with a Ray address. 1: the plain single-process loop
RAY_ADDRESS_ENV = "FACECLF_RAY_ADDRESS"  # default Ray cluster address for training ("local": a Ray instance here)
IMBALANCE_RATIO = 2.0                 # "auto" weights the loss when the largest class has more than this many
                                      # times the images of the smallest (a judgement between the measured 1 and 4)
DECODE_WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
                                      # one decoding thread per usable core (PIL releases the GIL);
                                      # more only oversubscribes (2 cores: 4 threads scored ~15% slower)
SCORE_BATCH_SIZE = 64
SCORE_PREFETCH_BATCHES = 2            # batches queued beyond the one each scoring worker holds
SCORE_FETCH_WORKERS = 16              # S3 GETs in flight while scoring a bucket prefix (latency-bound)
SCORE_PART_ROWS = 10_000              # prediction rows per part file (what a killed run can lose)
SCORE_RAY_ACTORS = 1                  # ONNX Runtime actors per CPU cluster (ORT already uses every core it is given)
SCORE_RAY_CHUNK = 10_000              # keys per Ray Data dataset: the driver holds one chunk's keys at a time

# Ingest (incoming/ -> face/): limits checked before and after download.
INGEST_WORKERS = 16                   # download threads; <= the S3 client's pooled connections
S3_POOL = 32                          # HTTP connections per S3 client; more ingest threads would wait
S3_RETRIES = 8                        # retries after the first attempt (botocore standard mode: backoff,
                                      # 5xx, throttling, connection errors); AWS_MAX_ATTEMPTS / AWS_RETRY_MODE win
S3_CONNECT_TIMEOUT = 10               # seconds; botocore's 60 s default makes an unreachable endpoint slow to report
S3_BODY_ATTEMPTS = 3                  # GETs whose body breaks off mid-download (botocore does not retry those)
MAX_BYTES = 25 * 2**20                # larger objects are refused from the listing, never downloaded
MIN_SIDE = 32                         # smaller images hold too little face to learn from
MAX_SIDE = 16384                      # longest side accepted (after the pixel-count guard below)
MAX_PIXELS = 40_000_000               # decompression-bomb guard, checked from the header before decoding
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")  # what the bytes must be (judged from the bytes, never the name)
MAX_CLASS_CHARS = 64                  # class names become folder names and model labels
MAX_NAME_BYTES = 200                  # object names longer than this are refused

# The decoded-image cache (uint8 shards next to face/, mirrored to the bucket).
SHARD_IMAGES = 2048                   # images per shard file: 2048 x 27 KB = 57 MB at 96 px
DECODE_IN_CHILD_ABOVE = 20_000        # decode this many new images or more in a fresh child process: the heap
                                      # a big in-process decode leaves behind was carried into the training that
                                      # follows (measured: 100,000 images, training peak RssAnon 1,463 MiB after
                                      # decoding all of them in the night process, 777 MiB after decoding 2,000);
                                      # a child costs ~1 s, under 2% of decoding 20,000. 0: never

# The optional int8 model (`faceclf export --int8`).
INT8_MIN_AGREEMENT = 0.995            # share of validation images on which int8 must predict fp32's class
INT8_CALIBRATION_IMAGES = 512         # at most this many validation images calibrate it (and judge it)
INT8_REDUCE_RANGE = False             # 7-bit weights: avoids u8s8 overflow on CPUs without VNNI (see README)

# Drift on arrival: tonight's new images against the train split already held (faceclf.nightly.drift).
DRIFT_CLASS_SHIFT = 0.20              # a class's share among the new images differs by more than this
DRIFT_SIZE_KS = 0.30                  # short sides: two-sample Kolmogorov-Smirnov statistic above this
DRIFT_BRIGHTNESS_KS = 0.30            # mean pixel value per image: KS statistic above this
DRIFT_ACCURACY_DROP = 0.10            # champion's accuracy on the new images below its test accuracy minus this
DRIFT_SAMPLE = 2000                   # images per side read for brightness (evenly spread)

# The champion watched between nights: every scoring run estimates the model's accuracy without labels
# (faceclf.serving.monitor: the mean of the calibrated probability of each predicted class, as NannyML's CBPE).
MONITOR_ACCURACY_DROP = 0.05          # alarm when that estimate is more than this below the model's test accuracy.
                                      # The estimate itself is steady (a mean of n confidences: sd ~0.1 / sqrt(n),
                                      # 0.014 at 50 images, so 0.05 is 3.5 sd of its own noise), but the test
                                      # accuracy it is set against is known to about +-0.04 on face-mask's 111 test
                                      # images (Wilson 95%): a smaller bar would alarm on the test set's luck. Half of
                                      # DRIFT_ACCURACY_DROP, which is measured with labels on a night's few new images
MONITOR_CLASS_SHIFT = 0.20            # alarm when a class's share of the predictions moves more than this from its
                                      # share of the model's test predictions: drift's bar on arrival (50/50 -> 70/30).
                                      # At 50 images a share's sampling sd is <= 0.071, the test set's (111) <= 0.047:
                                      # 0.20 is 2.3 sd of both together, 3.3 sd at 500 images
MONITOR_MIN_IMAGES = 50               # fewer scored images than this: the figures are recorded, no alarm raised (and
                                      # said so). Below it one image moves a share by over 0.02 and the bars above
                                      # stand within ~2 sd of noise

# The night.
MIN_NEW_IMAGES = 1                    # fewer new images than this since the last published version: the night
                                      # ends after ingest (no training, no version, champion untouched)
WARM_START = "auto"                   # fine-tune the champion (true), train from scratch (false), or decide per
                                      # night (auto: faceclf.nightly.start.choose_start): cold when the champion is
                                      # below the gate's bars on tonight's test split (issue 23's night: champion
                                      # 0.609 there, warm 0.963 vs cold 0.982) or more than WARM_MAX_NEW_SHARE of
                                      # the images are new to it, else warm. `python3 -m benchmarks --only
                                      # warmstart` (2026-12-06, 5 growth scenarios, seeds 0-2): warm (5 epochs) was
                                      # 0-2 test images behind cold in every scenario (0-0.7 points; never ahead)
                                      # in 0.37-0.47x the time; drift flags did not make it worse (README)
WARM_MAX_NEW_SHARE = 0.5              # auto: more than this share of the images new since the champion trains
                                      # from scratch. Measured: at 0.50 (face-mask doubling) warm = cold in all 3
                                      # seeds; at 0.75 (quadrupling) warm 0.991 vs 0.997, as at 0.09 (+10%):
                                      # the share did not move warm's cost, so the limit is a judgement: the
                                      # champion saw at least half of tonight's data (issue 23's night: 0.72)
APPROVAL_TIMEOUT_S = 12 * 3600       # with approval=true, no answer within this many seconds rejects the candidate
                                      # (before the next night's 02:00 run)
WARM_EPOCHS = 5                       # epochs of a warm-started night (3: 0.997, one test image lost)
STUCK_AFTER = 2                       # this many rejected nights in a row is a stuck pipeline: said atop the report,
                                      # in the rejection notification's subject and in `faceclf models list`
LEASE_SECONDS = 900                   # the bucket lease (models/face/lease.json) a night, `faceclf ingest` or
                                      # `models promote` holds lasts this long unless renewed (every third of it):
                                      # a worker that dies blocks the next one for at most this long. Hosts' clocks
                                      # must agree to well within it (NTP does)
LABEL_AUDITS = ("report", "exclude", "off")
LABEL_AUDIT = "report"                # the champion audits the labels of each night's new images (confident learning,
                                      # faceclf.nightly.audit): "report" lists the suspects (label_audit.csv, gallery,
                                      # report), "exclude" also leaves every recorded suspect out of train and val
                                      # (never test: filtering test by a model's opinion flatters that model),
                                      # "off" skips it. `python3 -m benchmarks --only audit` (README): precision 1.00,
                                      # recall 0.83-0.92 on face-mask with 5-20% of the labels flipped
LINK_SECONDS = 24 * 3600              # presigned links in a night's artifacts work this long: the morning's readers
                                      # have them, the next night publishes fresh ones, a leaked one soon dies

# Nights started by arrivals (flows/watch.py, every few minutes: deployments/prefect.yaml).
WATCH_MIN_NEW_IMAGES = 100            # a night starts once this many objects in incoming/ are new to ingest: a
                                      # night costs minutes of CPU (face-mask's 1,376 images: ~3 min on 2 cores),
                                      # 100 is 7% more data there; the 02:00 night still takes any fewer
WATCH_RENOTIFY_AFTER = 6 * 3600       # arrivals announced once are announced again after this long if no ingest
                                      # has taken them since (the night they started failed or never ran)

# Promotion gate.
MIN_ACCURACY = 0.90                   # overall test accuracy a candidate must reach
MIN_CLASS_ACCURACY = 0.85             # every class's test accuracy must reach this
TOLERANCE = 0.01                      # candidate accuracy may trail the champion's (same test images) by at most
                                      # this much: one image of face-mask's 111 (0.009) no longer decides alone
ALPHA = 0.05                          # McNemar's exact test on the discordant images: significantly worse (p < alpha)
                                      # is rejected; with require_improvement only significantly better promotes
CLASS_TOLERANCE = 0.02                # no class's F1 may trail the champion's on it by more than this, significantly
                                      # (paired permutation test, p < alpha), whatever overall accuracy does
GATE_PERMUTATIONS = 2000              # random swaps of the two models' predictions behind each class's p-value
                                      # (seeded: the same decision every time; p resolves to 1/2001)


DEVICES = ("auto", "cpu", "cuda")


def option(default: Any, help: str, flag: str | None = None, choices: Sequence[str] | None = None,
           parse: Any = None, cli: bool = True) -> Any:
    """A config field with its help text; by default also a command-line option, with an (optional) flag name,
    choices and parser of the option's text (default: the type of the default value). ``cli=False``: a setting
    of flows and files only (described, but no flag).

    ``faceclf.cli`` builds its options from these, the flows their parameter forms and the documentation its
    configuration reference, so none of them holds a copy of a default or a help text.
    """
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "parse": parse,
                                            "cli": cli})


def setting(default: Any, help: str) -> Any:
    """A described config field that is not a command-line option (``option(..., cli=False)``)."""
    return option(default, help, cli=False)


def is_option(f: dataclasses.Field) -> bool:
    """Whether the config field ``f`` is a command-line option (declared with ``option``, not ``setting``)."""
    return "help" in f.metadata and f.metadata.get("cli", True)


def option_flag(f: dataclasses.Field) -> str | None:
    """The command-line flag of the config field ``f`` (None: no option): its metadata "flag", else --name with
    _ as -; a bool that defaults to True is turned off by --no-<flag> (one that defaults to False turns on)."""
    if not is_option(f):
        return None
    flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
    return flag.replace("--", "--no-", 1) if isinstance(f.default, bool) and f.default else flag


def size_or_auto(text: str) -> int | str:
    """An image size option: a number of pixels, or "auto"."""
    return text if text == "auto" else int(text)


def auto_image_size(median_short_side: float, conv_blocks: int) -> int:
    """The "auto" image size: the median short side of the train images, at most AUTO_MAX_SIZE, rounded down
    to a multiple of 2 ** conv_blocks (each block halves the side) and at least 16."""
    step = 2 ** conv_blocks
    return max(16, step, int(min(AUTO_MAX_SIZE, median_short_side)) // step * step)


def imbalanced(counts: Sequence[float]) -> bool:
    """Whether the largest class count exceeds IMBALANCE_RATIO times the smallest (an empty class counts as 1):
    the rule of class_weighting "auto"."""
    return max(counts) > IMBALANCE_RATIO * max(1, min(counts))


def require_at_least(cfg: Any, minimum: float, *names: str) -> None:
    """ValueError naming the first of the fields ``names`` of ``cfg`` whose value is below ``minimum``."""
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(cfg, name)}")


def parse_warm_start(value: Any) -> bool | str:
    """A warm_start setting: True, False or "auto" (the strings "true"/"false" too, any case, as a flow
    parameter or an option arrives); ValueError naming anything else."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in ("auto", "true", "false"):
        return "auto" if text == "auto" else text == "true"
    raise ValueError(f"warm_start must be auto, true or false, got {value!r}")


def check_split_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """(train, val, test) shares as floats; ValueError unless three non-negative numbers summing to 1."""
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, got {fractions}")
    return values  # type: ignore[return-value]


def check_near_distance(distance: int) -> int:
    """``distance`` if it is a twin distance the index supports (0-16 of 64 bits), else ValueError."""
    if type(distance) is not int or not 0 <= distance <= 16:
        raise ValueError(f"near_distance must be a whole number of bits in [0, 16], got {distance!r}")
    return distance


@dataclass
class DataConfig:
    """How images are found, split and preprocessed."""

    image_size: int | str = option(IMAGE_SIZE, "square side the images are resized to (the CNN's input), or "
                                   f"auto: the train images' median short side, at most {AUTO_MAX_SIZE}",
                                   parse=size_or_auto)
    split_fractions: tuple[float, float, float] = option(SPLIT_FRACTIONS, "train / val / test shares of a folder "
                                                         "of class folders", flag="--split")
    near_distance: int = option(NEAR_DISTANCE, "images whose perceptual hashes differ in at most this many of 64 "
                                "bits are twins and share a split")
    mean: tuple[float, float, float] = setting(MEAN, "per-channel normalisation mean (ImageNet statistics)")
    std: tuple[float, float, float] = setting(STD, "per-channel normalisation standard deviation")
    max_rotation_deg: float = option(MAX_ROTATION_DEG, "training augmentation: rotation up to this many degrees")
    hflip_prob: float = option(HFLIP_PROB, "training augmentation: horizontal flip probability")
    decode_workers: int = option(DECODE_WORKERS, "image decoding threads", flag="--workers")

    def __post_init__(self) -> None:
        if self.image_size != "auto" and (not isinstance(self.image_size, int) or self.image_size < 16):
            raise ValueError(f"image_size must be an integer >= 16 or 'auto', got {self.image_size!r}")
        self.split_fractions = check_split_fractions(self.split_fractions)
        check_near_distance(self.near_distance)
        self.mean = tuple(self.mean)  # type: ignore[assignment]
        self.std = tuple(self.std)  # type: ignore[assignment]


@dataclass
class ModelConfig:
    """Shape of the custom CNN; stored in every checkpoint so the model can be rebuilt."""

    num_classes: int = setting(2, "output classes (set from the data by every run)")
    image_size: int = setting(AUTO_MAX_SIZE, "input side in pixels (set from the data's resolved image_size by "
                              "every run)")
    in_channels: int = setting(3, "input colour channels")
    conv_channels: tuple[int, ...] = option(CONV_CHANNELS, "conv block widths", flag="--channels")
    fc_hidden: int = option(FC_HIDDEN, "width of the hidden fully connected layer")
    dropout: float = option(DROPOUT, "dropout before each fully connected layer")
    batch_norm: bool = option(BATCH_NORM, "add batch norm after each convolution (default: the seed's plain blocks)")

    def __post_init__(self) -> None:
        self.conv_channels = tuple(int(c) for c in self.conv_channels)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not self.conv_channels:
            raise ValueError("conv_channels must name at least one block")
        min_size = 2 ** len(self.conv_channels)
        if isinstance(self.image_size, int) and self.image_size % min_size:  # "auto": set from the data later
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of {min_size} "
                f"(2 ** {len(self.conv_channels)} pooling blocks)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    """Optimisation and run control."""

    epochs: int = option(EPOCHS, "maximum epochs; early stopping usually ends sooner")
    batch_size: int = option(BATCH_SIZE, "images per training step")
    learning_rate: float = option(LEARNING_RATE, "peak learning rate (one-cycle AdamW)", flag="--lr")
    weight_decay: float = option(WEIGHT_DECAY, "AdamW weight decay")
    patience: int = option(PATIENCE, "early stop after this many epochs without a better val loss")
    seed: int = option(SEED, "seed of shuffling, augmentation and initialisation")
    device: str = option("auto", "auto: cuda when available, else cpu", choices=DEVICES)
    amp: bool = option(True, "bf16/fp16 autocast (used on CUDA and on CPUs with native bf16; "
                       "elsewhere full fp32)")
    channels_last: bool = option(True, "NHWC activations (faster convolutions on CPU and CUDA)")
    num_threads: int = option(0, "torch CPU threads (0: torch's default)", flag="--threads")
    init_from: str | None = option(None, "warm start: begin from the weights of this checkpoint.pt, or of this "
                                   "model version in --bucket's registry (same classes and architecture)")
    class_weighting: str = option(CLASS_WEIGHTING, "training loss weights per class: none, balanced "
                                  "(n_images / (n_classes * n_class), from the train split's counts), or auto "
                                  f"(balanced when the largest class has over {IMBALANCE_RATIO:g}x the images "
                                  "of the smallest, else none)",
                                  choices=CLASS_WEIGHTINGS)
    workers: int = option(WORKERS, "training processes: DDP through torchrun's launcher on this machine (one per "
                          "GPU; CPU processes share the cores), or Ray Train workers with --ray-address",
                          flag="--nproc-per-node")
    ray_address: str | None = option(None, "train on the Ray cluster at this address (host:port, ray://host:port, "
                                     f"auto; 'local' starts Ray here; default ${RAY_ADDRESS_ENV}) with --nproc-per-node "
                                     "workers (pip install -e '.[ray]')")

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers (--nproc-per-node) must be >= 1, got {self.workers}")
        require_at_least(self, 1, "epochs", "batch_size", "patience")
        if self.device not in DEVICES:
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(f"class_weighting must be one of {CLASS_WEIGHTINGS}, got {self.class_weighting!r}")


@dataclass
class ScoreConfig:
    """Batch scoring with ONNX Runtime."""

    batch_size: int = option(SCORE_BATCH_SIZE, "images per ONNX Runtime call")
    decode_workers: int = option(DECODE_WORKERS, "threads that each read, decode and score a whole batch (one ONNX "
                                 "Runtime thread each)", flag="--workers")
    prefetch_batches: int = option(SCORE_PREFETCH_BATCHES, "batches queued beyond the one per worker")
    fetch_workers: int = option(SCORE_FETCH_WORKERS, "threads fetching and decoding from a bucket (network-bound)")
    part_rows: int = option(SCORE_PART_ROWS, "rows per part file: a killed run resumes after its last part")
    ray_address: str | None = option(None, "score with Ray Data on the cluster at this address (host:port, "
                                     "ray://host:port, auto; 'local' starts Ray here) (pip install -e '.[ray]')")
    ray_actors: int = option(SCORE_RAY_ACTORS, "ONNX Runtime actors on a cluster without GPUs (with GPUs: one per GPU)")
    ray_chunk: int = option(SCORE_RAY_CHUNK, "keys handed to Ray Data at a time (bounds the driver's memory)")
    device: str = option("auto", "auto: the CUDA provider only where a GPU is present", choices=DEVICES)
    max_bytes: int = option(MAX_BYTES, "a larger image gets an error row and is never read (its listed size)")
    max_pixels: int = option(MAX_PIXELS, "an image whose header claims more pixels gets an error row and is never "
                             "decoded (decompression-bomb guard)")

    def __post_init__(self) -> None:
        require_at_least(self, 1, "batch_size", "decode_workers", "prefetch_batches", "fetch_workers", "part_rows",
                         "ray_actors", "ray_chunk", "max_bytes", "max_pixels")


@dataclass
class RunConfig:
    """Everything a training run resolved, saved as RUN/config.json."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain-types view (lists, not tuples) for JSON and checkpoints."""
        return json_ready(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Rebuild from ``to_dict`` output; unknown keys are an error, not silently dropped. A file written
        before the training section was named ``training`` holds it under ``train``."""
        unknown = set(d) - {"data", "model", "training", "train"}
        if unknown:
            raise ValueError(f"unknown config section(s) {sorted(unknown)}: expected data, model, training")
        return cls(
            data=DataConfig(**d.get("data", {})),
            model=ModelConfig(**d.get("model", {})),
            training=TrainConfig(**d.get("training", d.get("train", {}))),
        )


def with_overrides(cfg: RunConfig, **values: Any) -> RunConfig:
    """A copy of ``cfg`` with each named field set in every part that has it (``image_size`` is both the
    data's and the model's); None keeps the default. Flow parameters and CLI options arrive this way,
    by field name, so no list of fields is kept by hand."""
    parts = {name: dataclasses.asdict(getattr(cfg, name)) for name in ("data", "model", "training")}
    for key, value in values.items():
        owners = [p for p in parts.values() if key in p]
        if not owners:
            raise ValueError(f"{key!r} is not a setting of the data, model or training config")
        for p in owners:
            if value is not None:
                p[key] = tuple(value) if isinstance(value, list) else value
    return RunConfig.from_dict(parts)


def json_ready(obj: Any) -> Any:
    """Turn tuples into lists recursively so JSON and weights_only checkpoints hold plain types."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


@dataclass
class IngestConfig:
    """Limits and parallelism of one ingest run."""

    workers: int = setting(INGEST_WORKERS, f"download threads (at most the S3 client's {S3_POOL} pooled connections)")
    max_bytes: int = setting(MAX_BYTES, "larger objects are refused from the listing, never downloaded")
    min_side: int = setting(MIN_SIDE, "images with a shorter side are quarantined (too little face to learn from)")
    max_side: int = setting(MAX_SIDE, "images with a longer side are quarantined")
    max_pixels: int = setting(MAX_PIXELS, "decompression-bomb guard: a header claiming more pixels is quarantined "
                              "before decoding")
    allowed_formats: tuple[str, ...] = setting(ALLOWED_FORMATS, "formats the bytes must be (judged from the bytes, "
                                               "never the name)")
    split_fractions: tuple[float, float, float] = setting(SPLIT_FRACTIONS, "train / val / test shares of the "
                                                          "content-hash space")
    near_distance: int = option(NEAR_DISTANCE, "images whose perceptual hashes differ in at most this many of 64 bits "
                                "are twins: a new one joins its placed twin's split")
    # A new class is a decision, not an accident of an upload: without this, an image under incoming/<class>/
    # of a class neither the manifest nor the champion has is quarantined (retried once this is set).
    allow_new_classes: bool = option(False, "take images of a class that neither the manifest nor the champion "
                                     "has (without it they are quarantined, and taken by a later run with it)")

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= S3_POOL:
            raise ValueError(f"workers must be in [1, {S3_POOL}] (the S3 connection pool), got {self.workers}")
        require_at_least(self, 1, "max_bytes", "min_side", "max_pixels")
        if self.max_side < self.min_side:
            raise ValueError(f"max_side must be >= min_side ({self.min_side}), got {self.max_side}")
        self.allowed_formats = tuple(f.upper() for f in self.allowed_formats)
        if not self.allowed_formats or not set(self.allowed_formats) <= set(ALLOWED_FORMATS):
            raise ValueError(f"allowed_formats must be some of {ALLOWED_FORMATS} (the formats ingest names its "
                             f"files for), got {self.allowed_formats}")
        self.split_fractions = check_split_fractions(self.split_fractions)
        check_near_distance(self.near_distance)


@dataclass
class Int8Config:
    """Static int8 quantization of an exported model, and the agreement it must keep with fp32."""

    min_agreement: float = option(INT8_MIN_AGREEMENT, "refuse the int8 model below this share of validation images "
                                  "predicted as the fp32 model does")
    calibration_images: int = option(INT8_CALIBRATION_IMAGES, "validation images that calibrate and judge it (at most)")
    reduce_range: bool = option(INT8_REDUCE_RANGE, "7-bit weights (for CPUs without VNNI int8 instructions)")
    batch_size: int = setting(SCORE_BATCH_SIZE, "images per ONNX Runtime call while calibrating and judging")

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        require_at_least(self, 2, "calibration_images", "batch_size")


@dataclass
class CacheConfig:
    """How decoded images are kept: shard size and decoding threads (results never depend on them)."""

    shard_images: int = setting(SHARD_IMAGES, "images per shard file")
    decode_workers: int = setting(DECODE_WORKERS, "image decoding threads (one per usable core)")
    decode_in_child_above: int = setting(DECODE_IN_CHILD_ABOVE, "decode this many new images or more in a fresh "
                                         "child process, so its heap stays out of training (0: never)")

    def __post_init__(self) -> None:
        require_at_least(self, 0, "decode_in_child_above")
        require_at_least(self, 1, "shard_images", "decode_workers")


@dataclass
class DriftConfig:
    """Thresholds of the drift checks on arrival, and whether a drift stops the night before training."""

    class_shift: float = setting(DRIFT_CLASS_SHIFT, "flag a class whose share among the new images differs from "
                                 "the train split's by more than this")
    size_ks: float = setting(DRIFT_SIZE_KS, "flag image short sides whose two-sample Kolmogorov-Smirnov statistic "
                             "exceeds this")
    brightness_ks: float = setting(DRIFT_BRIGHTNESS_KS, "flag mean pixel values whose KS statistic exceeds this")
    accuracy_drop: float = setting(DRIFT_ACCURACY_DROP, "flag the champion's accuracy on the new images falling "
                                   "below its test accuracy minus this")
    sample: int = setting(DRIFT_SAMPLE, "images per side read for brightness (evenly spread)")
    fail_on_drift: bool = setting(False, "stop the night before training when anything drifted (default: flag it "
                                  "in the report and train)")

    def __post_init__(self) -> None:
        for name in ("class_shift", "size_ks", "brightness_ks", "accuracy_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"drift {name} must be in [0, 1], got {getattr(self, name)}")
        if self.sample < 1:
            raise ValueError(f"drift sample must be >= 1, got {self.sample}")


@dataclass
class MonitorConfig:
    """The champion watched between nights: the alarms of every scoring run's label-free accuracy estimate."""

    accuracy_drop: float = option(MONITOR_ACCURACY_DROP, "alarm when the estimated accuracy (mean probability of "
                                  "each predicted class) falls more than this below the model's test accuracy, "
                                  "significantly (its interval and the test set's own noise)")
    class_shift: float = option(MONITOR_CLASS_SHIFT, "alarm when a class's share of the predictions moves more than "
                                "this from its share of the model's test predictions, significantly (both "
                                "sample sizes)")
    min_images: int = option(MONITOR_MIN_IMAGES, "fewer scored images than this: the estimate is recorded, no alarm "
                             "raised")

    def __post_init__(self) -> None:
        for name in ("accuracy_drop", "class_shift"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"monitor {name} must be in [0, 1], got {getattr(self, name)}")
        require_at_least(self, 1, "min_images")


@dataclass
class NightConfig:
    """When a night trains at all."""

    min_new_images: int = setting(MIN_NEW_IMAGES, "fewer new images than this since the last published version "
                                  "end the night after ingest (no training, no version, champion untouched)")
    force: bool = setting(False, "train even when nothing is new")
    allow_new_classes: bool = setting(False, "accept a class appearing or vanishing (a deliberate change, not an "
                                      "accident of an upload)")
    warm_start: bool | str = setting(WARM_START, "fine-tune the champion (true), train from scratch (false), or "
                                     "auto: cold when the champion fails the gate's bars on tonight's test split or "
                                     "more than warm_max_new_share of the images are new to it, else warm")
    warm_epochs: int = setting(WARM_EPOCHS, "epochs of a warm-started night")
    int8: bool = setting(False, "also publish model.int8.onnx with a promoted model, where it agrees with fp32")
    approval: bool = setting(False, "after the gate passes, pause until a person approves or rejects the candidate")
    approval_timeout: int = setting(APPROVAL_TIMEOUT_S, "seconds to wait for that answer; none rejects the candidate")
    stuck_after: int = setting(STUCK_AFTER, "this many rejected nights in a row is a stuck pipeline (said in the "
                               "report, the notification and `faceclf models list`)")
    warm_max_new_share: float = setting(WARM_MAX_NEW_SHARE, "warm_start auto: above this share of images new to the "
                                        "champion, train from scratch")
    lease_seconds: int = setting(LEASE_SECONDS, "the bucket lease a night holds lasts this long unless renewed")
    link_seconds: int = setting(LINK_SECONDS, "presigned links in the night's artifacts work this long")
    label_audit: str = setting(LABEL_AUDIT, "report: list new images whose label the champion contradicts; exclude: "
                               "also leave every recorded suspect out of train and val; off: no audit")

    def __post_init__(self) -> None:
        require_at_least(self, 1, "stuck_after")
        if self.label_audit not in LABEL_AUDITS:
            raise ValueError(f"label_audit must be one of {LABEL_AUDITS}, got {self.label_audit!r}")
        require_at_least(self, 3, "lease_seconds")
        if not 1 <= self.link_seconds <= 7 * 24 * 3600:  # SigV4 presigned URLs live at most 7 days
            raise ValueError(f"link_seconds must be in [1, 604800] (7 days), got {self.link_seconds}")
        if self.min_new_images < 0:
            raise ValueError(f"min_new_images must be >= 0, got {self.min_new_images}")
        if self.warm_epochs < 1:
            raise ValueError(f"warm_epochs must be >= 1, got {self.warm_epochs}")
        self.warm_start = parse_warm_start(self.warm_start)
        if not 0.0 <= self.warm_max_new_share <= 1.0:
            raise ValueError(f"warm_max_new_share must be in [0, 1], got {self.warm_max_new_share}")
        if self.approval_timeout < 1:
            raise ValueError(f"approval_timeout must be >= 1 second, got {self.approval_timeout}")


@dataclass
class WatchConfig:
    """When arrivals in incoming/ start a night (the watch flow's poll)."""

    min_new_images: int = setting(WATCH_MIN_NEW_IMAGES, "start a night once at least this many objects in "
                                  "incoming/ are new to ingest (listed against its manifest and quarantine log)")
    renotify_after: int = setting(WATCH_RENOTIFY_AFTER, "seconds after which arrivals already announced, and still "
                                  "not ingested, are announced again")

    def __post_init__(self) -> None:
        require_at_least(self, 1, "min_new_images", "renotify_after")


@dataclass
class GateConfig:
    """Thresholds of the promotion gate."""

    min_accuracy: float = setting(MIN_ACCURACY, "overall test accuracy a candidate must reach")
    min_class_accuracy: float = setting(MIN_CLASS_ACCURACY, "test accuracy every class must reach")
    tolerance: float = setting(TOLERANCE, "the candidate's accuracy may trail the champion's (same test images) by "
                               "at most this much")
    alpha: float = setting(ALPHA, "significance level: significantly worse than the champion (exact McNemar, "
                           "p < alpha) is rejected")
    class_tolerance: float = setting(CLASS_TOLERANCE, "no class's F1 may trail the champion's by more than this, "
                                     "significantly (paired permutation test)")
    require_improvement: bool = setting(False, "promote only a candidate significantly better than the champion")
    permutations: int = setting(GATE_PERMUTATIONS, "random swaps behind each class's permutation p-value (seeded)")

    def __post_init__(self) -> None:
        for name in ("min_accuracy", "min_class_accuracy"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        require_at_least(self, 0, "tolerance", "class_tolerance")
        require_at_least(self, 1, "permutations")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")


# Where each concern is set: the configuration reference (docs, generated by faceclf.devtools.configdoc) lists
# them in this order. The flows' parameter groups (flows/params.py) are these sections under the same names.
SECTIONS: dict[str, tuple[type, str]] = {
    "data": (DataConfig, "`faceclf train` options; the train flow's `data` parameter; RUN/config.json `data`"),
    "model": (ModelConfig, "`faceclf train` options; the train flow's `model` parameter (the fields set from the "
                           "data excepted); RUN/config.json `model`"),
    "training": (TrainConfig, "`faceclf train` options; the train flow's `training` parameter (init_from excepted: "
                              "a night's warm start is night.warm_start); RUN/config.json `training`"),
    "gate": (GateConfig, "the train flow's `gate` parameter"),
    "drift": (DriftConfig, "the train flow's `drift` parameter"),
    "night": (NightConfig, "the train flow's `night` parameter"),
    "watch": (WatchConfig, "the watch flow's `watch` parameter (deployment watch/incoming)"),
    "quantization": (Int8Config, "`faceclf export --int8` options; the train flow's `quantization` parameter"),
    "scoring": (ScoreConfig, "`faceclf score` options; the score flow's `scoring` parameter"),
    "monitor": (MonitorConfig, "`faceclf score` options; the score flow's `monitor` parameter"),
    "ingest": (IngestConfig, "`faceclf ingest` and `faceclf resplit` options (a night ingests with the defaults, "
                             "night.allow_new_classes aside)"),
    "cache": (CacheConfig, "the library's decoded-image cache (faceclf.dataset.cache); no option"),
}
