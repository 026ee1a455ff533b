"""One experiment = a frozen config -> a run -> a plain-JSON record; runs cached by config hash."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from eglib import config as egconfig
from eglib.data import dataset_info, load_dataset, take_subset
from eglib.defenses import DEFENSES, DefenseContext, make_defense, recorded_params
from eglib.defenses.base import Defense, UndefendedRun
from eglib.evaluate import (
    EVAL_BATCH_SIZE,
    accuracy,
    attack_success_rates,
    evaluate_protocols,
    guards_eval_mode,
)
from eglib.io import (
    config_hash,
    environment_info,
    file_digest,
    load_state,
    read_json,
    save_state_atomic,
    write_json_atomic,
)
from eglib.models import MODELS, make_model
from eglib.models.base import PENULTIMATE, StagedNet
from eglib.params import check_bool, check_float, check_int
from eglib.poison import PoisonedSet, TriggeredSet, backdoor_testset, make_attack, poison_dataset
from eglib.registry import lookup
from eglib.train import CheckpointMismatchError, TrainSettings, check_probe_steps, train_model

RECORD_VERSION = 1
RECORD_FILE, MODEL_FILE = "record.json", "model.pt"  # a run folder's record and weights
TRAIN_LOCK = "train.lock"  # held while a process loads or trains the run
CHECKPOINT_FILE = "checkpoint.pt"  # the unfinished main training of the run
CONFIG_FILE = "config.json"  # the run's config, written when its training starts
# A record's digest of its weights file: tells one training of a run from a later retraining,
# so what was computed from the earlier model (a repair, detection scores) is not served.
MODEL_DIGEST = "model_digest"

Params = tuple[tuple[str, Any], ...]


def _frozen_value(name: str, value: Any) -> Any:
    """`value` with its lists as tuples (a YAML or JSON grid, or a record, gives a tuple
    parameter as a list); ValueError naming `name` if it is still unhashable (a dict)."""
    if isinstance(value, list | tuple):
        value = tuple(_frozen_value(name, v) for v in value)
    try:
        hash(value)
    except TypeError:
        raise ValueError(
            f"parameter {name}={value!r} is not hashable; use numbers, strings or lists"
        ) from None
    return value


def _freeze(params: dict[str, Any] | Params | None) -> Params:
    """Parameters as a sorted tuple of pairs, so configs stay hashable and order-free."""
    items = params.items() if isinstance(params, dict) else (params or ())
    return tuple(sorted((str(k), _frozen_value(str(k), v)) for k, v in items))


def _check_field_types(cfg: ExperimentConfig) -> None:
    """ValueError naming the first config field of the wrong type or range (a YAML grid's
    `seed: "0"` would make another cache key, `epochs: 2.5` a crash deep in training)."""
    for name in ("dataset", "model", "defense", "attack"):
        value = getattr(cfg, name)
        if not (value is None and name == "attack") and (not isinstance(value, str) or not value):
            none = " or None" if name == "attack" else ""
            raise ValueError(f"{name}={value!r}; must be a name (str){none}")
    for name, minimum in (("seed", 0), ("target", 0), ("epochs", 1), ("batch_size", 2)):
        check_int(name, getattr(cfg, name), minimum)
    for name in ("train_size", "test_size"):
        if getattr(cfg, name) is not None:
            check_int(name, getattr(cfg, name), 1)
    check_bool("augment", cfg.augment)
    if cfg.attack is None and cfg.attack_params:
        raise ValueError(
            f"attack_params={dict(cfg.attack_params)!r} with attack=None: no attack takes them"
        )
    for name in ("poison_rate", "target") if cfg.attack is None else ():
        default = next(f.default for f in dataclasses.fields(cfg) if f.name == name)
        if getattr(cfg, name) != default:  # else clean runs differing only here get two keys
            raise ValueError(
                f"{name}={getattr(cfg, name)!r} with attack=None: no attack uses it; leave it "
                f"at its default ({default!r})"
            )
    stages = cfg.track_stages
    if isinstance(stages, str) or not all(isinstance(x, str) and x for x in stages):
        raise ValueError(f"track_stages={stages!r}; must be a list of stage names (str)")
    check_probe_steps(cfg.track_steps, "track_steps")


@dataclass(frozen=True, eq=False)
class ExperimentConfig:
    """Everything that determines a run; two equal configs give the same record and model.

    Equal means equal cache keys (`key`): 1 and 1.0 in a parameter are told apart, as their
    keys are, and the float fields are stored as floats (lr=1 is lr=1.0)."""

    dataset: str = "fashion-mnist"
    model: str = "cnn-small"
    attack: str | None = "badnets"
    attack_params: Params = ()
    poison_rate: float = 0.1
    target: int = 0
    defense: str = "none"
    defense_params: Params = ()
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.05
    # Random crop + flip shift a corner trigger and, in short runs on 28 px data, by themselves
    # suppress BadNets (measured: ASR 10 % with crop vs 98 % without, 4000 images, 4 epochs):
    # off by default so the defence comparison does not credit augmentation (ablations turn it on).
    augment: bool = False
    train_size: int | None = None  # training images before the clean reserve (None: all)
    test_size: int | None = None
    clean_reserve: float = 0.05  # fraction of the training split held out clean for FT/NAD/ANP
    track_stages: tuple[str, ...] = ()  # stages whose effective rank is recorded per epoch
    # optimizer steps at which the first training also records ACC, ASR and the tracked ranks
    # mid-epoch (`probes` in the history rows; 0: before the first step)
    track_steps: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "attack_params", _freeze(self.attack_params))
        object.__setattr__(self, "defense_params", _freeze(self.defense_params))
        _check_field_types(self)
        object.__setattr__(self, "track_stages", tuple(self.track_stages))
        object.__setattr__(self, "track_steps", tuple(self.track_steps))  # checked above
        rate_range: dict[str, Any] = {"low": 0.0, "high": 1.0, "low_open": True}
        floats = {
            "poison_rate": rate_range if self.attack is not None else {},
            "lr": {"low": 0.0, "low_open": True},
            "clean_reserve": {"low": 0.0, "high": 0.5, "high_open": True},
        }
        for name, bounds in floats.items():
            object.__setattr__(self, name, check_float(name, getattr(self, name), **bounds))

    @classmethod
    def from_profile(
        cls, profile: str | egconfig.Profile | None = None, **overrides: Any
    ) -> ExperimentConfig:
        """A config sized by a profile (EGLIB_PROFILE when None), with explicit overrides."""
        prof = profile if isinstance(profile, egconfig.Profile) else egconfig.get_profile(profile)
        sized: dict[str, Any] = {
            "epochs": prof.epochs,
            "batch_size": prof.batch_size,
            "train_size": prof.train_size,
            "test_size": prof.test_size,
            "seed": prof.seeds[0],
        }
        _check_field_names(overrides)
        return cls(**{**sized, **overrides})

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data."""
        data = dataclasses.asdict(self)
        data["attack_params"] = dict(self.attack_params)
        data["defense_params"] = dict(self.defense_params)
        data["track_stages"] = list(self.track_stages)
        data["track_steps"] = list(self.track_steps)
        if not self.track_steps:  # added later: left out at its default, so earlier keys hold
            del data["track_steps"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        """Inverse of `to_dict`; unknown keys are an error naming them."""
        _check_field_names(data)
        return cls(**data)

    def key(self) -> str:
        """The cache key: a hash of the config and the record format version."""
        return config_hash({"config": self.to_dict(), "version": RECORD_VERSION})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExperimentConfig) and self.key() == other.key()

    def __hash__(self) -> int:
        return hash(self.key())


def _check_field_names(data: dict[str, Any]) -> None:
    """ValueError naming the keys of `data` that are not ExperimentConfig fields."""
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(names)}")


@dataclass
class ExperimentData:
    """The tensors of a run: poisoned training set, clean reserve, clean and triggered test sets."""

    poisoned: PoisonedSet | None
    train_images: torch.Tensor
    train_labels: torch.Tensor
    reserve_images: torch.Tensor
    reserve_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    triggered: TriggeredSet | None


@dataclass
class ExperimentResult:
    """A finished run: its JSON record, the trained model (eval mode) and its data."""

    config: ExperimentConfig
    record: dict[str, Any]
    model: StagedNet
    data: ExperimentData = field(repr=False)


def run_dir(cfg: ExperimentConfig | str) -> Path:
    """The cache folder of a config's run (or of the run with this key)."""
    return egconfig.cache_dir() / "runs" / (cfg if isinstance(cfg, str) else cfg.key())


def _changed(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """{name: (recorded, current)} for every parameter whose values differ."""
    return {
        name: (recorded.get(name), current.get(name))
        for name in sorted(set(current) | set(recorded))
        if recorded.get(name) != current.get(name)
    }


def stale_defense_params(cfg: ExperimentConfig, record: dict[str, Any]) -> dict[str, Any]:
    """{param: (recorded, current)} where a cached run's resolved defence parameters differ
    from those `cfg` resolves to now; empty when they agree or the record names none.

    A config names only the parameters it sets, so the cache key does not change when a
    defence's default does: this is what tells a record trained under the old default."""
    if "params" not in record.get("defense", {}):
        return {}
    current = recorded_params(cfg.defense, dict(cfg.defense_params))
    return _changed(record["defense"]["params"], current)


_RESOLVED_ATTACKS: dict[str, dict[str, Any]] = {}  # memo of _attack_params by config_hash


def _attack_params(attack: str, params: Params, target: int, num_classes: int) -> dict[str, Any]:
    """The resolved parameters of the attack a run builds, as its record holds them (memoised
    by value and type: a parameter given as 1, 1.0 and True is validated three times)."""
    key = config_hash([attack, params, target, num_classes])
    if key not in _RESOLVED_ATTACKS:
        built = make_attack(attack, target=target, num_classes=num_classes, **dict(params))
        _RESOLVED_ATTACKS[key] = json.loads(json.dumps(built.params()))
    return dict(_RESOLVED_ATTACKS[key])


def stale_attack_params(cfg: ExperimentConfig, record: dict[str, Any]) -> dict[str, Any]:
    """`stale_defense_params` for the attack: {param: (recorded, current)} where the cached
    run's poisoning used other parameters (an attack default changed since)."""
    if cfg.attack is None or not record.get("poison"):
        return {}
    num_classes = dataset_info(cfg.dataset).num_classes
    current = _attack_params(cfg.attack, cfg.attack_params, cfg.target, num_classes)
    return _changed(record["poison"]["params"], current)


def _model_digest_of(key: str) -> str | None:
    """The `MODEL_DIGEST` of the cached run with this key (None: no record, or a record
    written before records held one)."""
    path = run_dir(key) / RECORD_FILE
    return read_json(path).get(MODEL_DIGEST) if path.exists() else None


def stale_base_model(record: dict[str, Any]) -> str | None:
    """The key of the undefended run a cached record started from (`poisoned_model_from`)
    when that run has been retrained since (its model digest changed), else None."""
    base = record.get("poisoned_model_from")
    path = None if base is None else run_dir(base) / RECORD_FILE
    if path is None or not path.exists():
        return None
    retrained = read_json(path).get(MODEL_DIGEST) != record.get("poisoned_model_digest")
    return base if retrained else None


def stale_reason(cfg: ExperimentConfig, record: dict[str, Any]) -> str | None:
    """Why `cfg`'s cached `record` would be retrained, not served ("other defence parameters
    ...", "other attack parameters ...", "the model of undefended run ..."), or None."""
    defence, attack, base = (
        stale_defense_params(cfg, record),
        stale_attack_params(cfg, record),
        stale_base_model(record),
    )
    return (
        (defence and f"other defence parameters (recorded, current): {defence}")
        or (attack and f"other attack parameters (recorded, current): {attack}")
        or (base and f"the model of undefended run {base}, which was retrained since")
        or None
    )


def cached_record(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The cached record of `cfg`'s finished run (written after its model), or None when
    there is none, it was trained under other defence or attack defaults
    (`stale_defense_params`, `stale_attack_params`), or it started from an undefended run
    that has been retrained since (`stale_base_model`)."""
    path = run_dir(cfg) / RECORD_FILE
    if not path.exists():
        return None
    record = read_json(path)
    reason = stale_reason(cfg, record)
    if reason:
        warnings.warn(
            f"cached run {cfg.key()} ({cfg.attack}, {cfg.defense}) was trained with {reason}; "
            "it is not used and will be retrained",
            stacklevel=2,
        )
        return None
    return record


def derived_stamp(record: dict[str, Any]) -> dict[str, Any]:
    """What a file computed from a run's model (detection scores, trigger ranks) stores, so
    that `derived_is_current` can tell when the run was retrained since."""
    return {MODEL_DIGEST: record.get(MODEL_DIGEST)}


def derived_is_current(cfg: ExperimentConfig, stored: dict[str, Any]) -> bool:
    """Whether `stored` (holding `derived_stamp`) was computed from the model of `cfg`'s
    current cached run: False when the run is not cached or was retrained since. Files and
    records written before records held a digest match each other (both None)."""
    record = cached_record(cfg)
    return record is not None and stored.get(MODEL_DIGEST) == record.get(MODEL_DIGEST)


def _loadable_record(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """`cached_record` of `cfg` when its model is cached too, so the run can be loaded."""
    return cached_record(cfg) if (run_dir(cfg) / MODEL_FILE).exists() else None


def is_cached(cfg: ExperimentConfig) -> bool:
    """Whether the cache holds the current finished run of `cfg` (see `cached_record`)."""
    return cached_record(cfg) is not None


@functools.lru_cache(maxsize=32)
def _model_skeleton(name: str, num_classes: int, in_channels: int) -> StagedNet:
    """Model `name` built on the meta device (no weights): its stages and features."""
    with torch.device("meta"):
        return make_model(name, num_classes, in_channels)


def check_config(cfg: ExperimentConfig) -> None:
    """ValueError for a config that cannot run, before any data is read or model trained: an
    unknown data set, model, attack or defence, a target outside the data set's classes, a
    parameter the attack or defence does not take or refuses, a stage the model lacks
    (`track_stages`, the defence's layers) or no clean reserve for a defence that needs one
    (each named, with what is allowed)."""
    info = dataset_info(cfg.dataset)
    lookup(MODELS, "model", cfg.model)
    if not 0 <= cfg.target < info.num_classes:
        raise ValueError(
            f"target={cfg.target}; {cfg.dataset} has classes 0..{info.num_classes - 1}"
        )
    if cfg.attack is not None:
        _attack_params(cfg.attack, cfg.attack_params, cfg.target, info.num_classes)
    defense = make_defense(cfg.defense, **dict(cfg.defense_params))
    if defense.needs_clean_data and cfg.clean_reserve == 0:
        raise ValueError(
            f"clean_reserve=0 with defense={cfg.defense!r}, which needs clean data; "
            "allowed: 0 < clean_reserve < 0.5"
        )
    model = _model_skeleton(cfg.model, info.num_classes, info.in_channels)
    features = [*model.stages, PENULTIMATE]
    unknown = [s for s in cfg.track_stages if s not in features]
    if unknown:
        raise ValueError(f"track_stages {unknown} not in {cfg.model}'s features {features}")
    defense.check_model(model)


def prepare_data(cfg: ExperimentConfig) -> ExperimentData:
    """Load, subsample, hold out the clean reserve, poison the rest, trigger the test set."""
    check_config(cfg)
    info = dataset_info(cfg.dataset)
    train = load_dataset(cfg.dataset, "train")
    train_x, train_y = take_subset(*train, cfg.train_size, cfg.seed, name="train_size")
    test = load_dataset(cfg.dataset, "test")
    test_x, test_y = take_subset(*test, cfg.test_size, cfg.seed, name="test_size")
    n_reserve = round(cfg.clean_reserve * len(train_y))
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(cfg.seed + 1))
    reserve, rest = order[:n_reserve].sort().values, order[n_reserve:].sort().values
    data = ExperimentData(
        poisoned=None,
        train_images=train_x[rest],
        train_labels=train_y[rest],
        reserve_images=train_x[reserve],
        reserve_labels=train_y[reserve],
        test_images=test_x,
        test_labels=test_y,
        triggered=None,
    )
    if cfg.attack is not None:
        attack = make_attack(
            cfg.attack, target=cfg.target, num_classes=info.num_classes, **dict(cfg.attack_params)
        )
        data.poisoned = poison_dataset(
            data.train_images, data.train_labels, attack, cfg.poison_rate, cfg.seed
        )
        data.train_images, data.train_labels = data.poisoned.images, data.poisoned.labels
        data.triggered = backdoor_testset(test_x, test_y, attack, cfg.seed)
    return data


def _settings(cfg: ExperimentConfig) -> TrainSettings:
    info = dataset_info(cfg.dataset)
    return TrainSettings(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        augment=cfg.augment,
        hflip=info.hflip,
    )


def _epoch_metrics(data: ExperimentData, n: int = 1000) -> Any:
    """A per-epoch evaluation: ACC on up to n clean test images, ASR on up to n triggered ones
    and `asr_correct`, the ASR among those the model classifies right without the trigger
    (None when none is: early in training a model that puts every image in one class scores
    an ASR of 0 or 100 % that says nothing about the trigger)."""
    trig = data.triggered
    if trig is not None:  # the images of the triggered rows, chosen once, not every epoch
        args = (trig.images[:n], trig.labels[:n], trig.source_labels[:n])
        clean = data.test_images[trig.idx[:n]]

    def evaluate_epoch(model: StagedNet) -> dict[str, float | None]:
        with guards_eval_mode(model, "running"):  # per sample, as the run's reported metrics
            row: dict[str, float | None] = {
                "acc": accuracy(model, data.test_images[:n], data.test_labels[:n])
            }
            if trig is not None:
                row["asr"], row["asr_correct"] = attack_success_rates(model, clean, *args)
        return row

    return evaluate_epoch


def seeded_model(name: str, num_classes: int, in_channels: int, seed: int) -> StagedNet:
    """A fresh model whose initial weights depend only on `seed`, not on the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_model(name, num_classes, in_channels)


@contextmanager
def training_lock(cfg: ExperimentConfig) -> Iterator[None]:
    """Hold the lock of `cfg`'s run folder, so that one process at a time loads or trains it;
    a second process asked for a run in use waits (with a warning) for the first."""
    folder = run_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / TRAIN_LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        warnings.warn(
            f"run {cfg.key()} is being loaded or trained by another process "
            f"(lock {lock.lock_file}); waiting for it to finish, then loading it",
            stacklevel=3,
        )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def undefended_config(cfg: ExperimentConfig) -> ExperimentConfig | None:
    """The run whose model `cfg`'s defence starts from (`cfg` without its defence), or None
    when the defence trains its own (not `starts_from_poisoned_model`) or there is no attack."""
    if (
        cfg.attack is None
        or not lookup(DEFENSES, "defence", cfg.defense).starts_from_poisoned_model
    ):
        return None
    return cfg.replace(defense="none", defense_params={})


def cached_undefended(cfg: ExperimentConfig) -> UndefendedRun | None:
    """The cached `undefended_config` run of `cfg` (model state, history, key), or None when
    there is none or the cache lacks it; waits for it while another process trains it."""
    base = undefended_config(cfg)
    if base is None:
        return None
    with training_lock(base):
        record = _loadable_record(base)
        if record is None:
            return None
        return load_state(run_dir(base) / MODEL_FILE), list(record["history"]), base.key()


def _build_context(
    cfg: ExperimentConfig,
    data: ExperimentData,
    device: torch.device,
    progress: bool,
    checkpoint: Path | None,
    reuse: bool = False,
) -> DefenseContext:
    info = dataset_info(cfg.dataset)
    settings = _settings(cfg)
    callbacks_default: list[Any] = []
    if cfg.track_stages and data.triggered is not None:
        from eglib.spectral import RankTracker

        clean_rows = data.triggered.idx  # the same test images, clean and triggered
        callbacks_default.append(
            RankTracker(
                data.test_images[clean_rows], data.triggered.images, cfg.track_stages, seed=cfg.seed
            )
        )
    trainings = [0]  # trainings started so far in this run

    def trainer(
        model: StagedNet,
        images: torch.Tensor,
        labels: torch.Tensor,
        callbacks: tuple[Any, ...] = (),
    ) -> list[dict[str, Any]]:
        # Only the first (main) training of a run checkpoints, so an interrupted run resumes,
        # and probes mid-epoch (a retraining on fewer images has other epoch ends).
        first = trainings[0] == 0
        trainings[0] += 1
        ckpt = checkpoint if first else None

        def train() -> list[dict[str, Any]]:
            return train_model(
                model,
                images,
                labels,
                settings,
                seed=cfg.seed,
                device=device,
                callbacks=[*callbacks_default, *callbacks],
                progress=progress,
                checkpoint_path=ckpt,
                eval_fn=_epoch_metrics(data),
                probe_steps=cfg.track_steps if first else (),
            )

        try:
            return train()
        except CheckpointMismatchError as error:
            # The run's own checkpoint, from an attempt whose first training was another one
            # (a data filter that trained its poisoned model, now taken from the cache) or
            # saw other data (ABL isolating other samples): start this training afresh.
            assert ckpt is not None  # only a checkpoint mismatches
            warnings.warn(f"{error}; discarding it and training from the start", stacklevel=2)
            ckpt.unlink()
            return train()

    poison_idx = (
        data.poisoned.poison_idx if data.poisoned is not None else torch.empty(0, dtype=torch.long)
    )
    return DefenseContext(
        images=data.train_images,
        labels=data.train_labels,
        poison_idx=poison_idx,
        clean_images=data.reserve_images,
        clean_labels=data.reserve_labels,
        num_classes=info.num_classes,
        model_factory=lambda: seeded_model(cfg.model, info.num_classes, info.in_channels, cfg.seed),
        train=trainer,
        seed=cfg.seed,
        device=device,
        progress=progress,
        undefended=(lambda: cached_undefended(cfg)) if reuse else None,
    )


def evaluate_run(model: StagedNet, cfg: ExperimentConfig, data: ExperimentData) -> dict[str, Any]:
    """Clean ACC and, for an attack, ACC and ASR under the three protocols (per-sample, mixed,
    pure, in batches of `eval_batch_size`); the headline `acc` and `asr` are per-sample
    whatever the guards' own eval mode."""
    if data.triggered is None:
        with guards_eval_mode(model, "running"):
            return {"acc": accuracy(model, data.test_images, data.test_labels)}
    protocols = evaluate_protocols(
        model,
        data.test_images,
        data.test_labels,
        data.triggered,
        poison_rate=cfg.poison_rate,
        batch_size=EVAL_BATCH_SIZE,
        seed=cfg.seed,
    )
    per_sample = protocols["per_sample"]
    return {
        "acc": per_sample["acc"],
        "protocols": protocols,
        "asr": per_sample["asr"],
        "eval_batch_size": EVAL_BATCH_SIZE,
    }


def run_experiment(
    cfg: ExperimentConfig,
    *,
    cache: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> ExperimentResult:
    """Run (or load from the cache) one experiment; the record is plain JSON data.

    With the cache on, a defence that starts from a model trained on the poisoned data (FT,
    NAD, ANP, the data filters) takes the cached undefended run of the same config when there
    is one, as BackdoorBench's defences load the attack's model: every defence then repairs
    the very model of the 'none' row, and a full-profile training is saved. The record's
    `poisoned_model_from` names that run's key (None: trained here). Two processes asked
    for the same uncached run do not both train it: the second waits (`training_lock`) and
    loads the first one's run.
    """
    dev = torch.device(device) if device is not None else egconfig.default_device()
    data = prepare_data(cfg)
    defense = make_defense(cfg.defense, **dict(cfg.defense_params))
    if not cache:
        return _train_run(cfg, data, defense, dev, progress, cache=False)
    with training_lock(cfg):
        cached = _loadable_record(cfg)
        if cached is None:
            return _train_run(cfg, data, defense, dev, progress, cache=True)
        ctx = _build_context(cfg, data, dev, progress=False, checkpoint=None)
        model = defense.build_model(ctx)
        model.load_state_dict(load_state(run_dir(cfg) / MODEL_FILE))
        return ExperimentResult(cfg, cached, model.to(dev).eval(), data)


def _train_run(
    cfg: ExperimentConfig,
    data: ExperimentData,
    defense: Defense,
    dev: torch.device,
    progress: bool,
    *,
    cache: bool,
) -> ExperimentResult:
    """Train and evaluate one run; with `cache`, checkpoint it and store its model and record."""
    folder = run_dir(cfg)
    if cache:  # names an unfinished run to `eglib.inventory` before any record exists
        write_json_atomic(folder / CONFIG_FILE, cfg.to_dict())
    ctx = _build_context(
        cfg,
        data,
        dev,
        progress,
        checkpoint=folder / CHECKPOINT_FILE if cache else None,
        reuse=cache,
    )
    start = time.perf_counter()
    outcome = defense.run(ctx)
    train_seconds = time.perf_counter() - start
    model = outcome.model.to(dev).eval()
    start = time.perf_counter()
    metrics = evaluate_run(model, cfg, data)
    record = {
        "version": RECORD_VERSION,
        "key": cfg.key(),
        "config": cfg.to_dict(),
        "metrics": metrics,
        "history": ctx.history,
        "defense": {"name": cfg.defense, "params": defense.params(), "info": outcome.info},
        "poisoned_model_from": ctx.reused,  # the cached undefended run it started from, if any
        "poisoned_model_digest": None if ctx.reused is None else _model_digest_of(ctx.reused),
        "poison": None
        if data.poisoned is None
        else {
            "attack": data.poisoned.attack_name,
            "params": data.poisoned.attack_params,
            "n_poisoned": len(data.poisoned.poison_idx),
            "n_train": len(data.train_labels),
        },
        "timings": {"train_s": train_seconds, "eval_s": time.perf_counter() - start},
        "environment": environment_info(dev),
    }
    json.dumps(record)  # fails loudly here, not in the cache, if anything is not plain data
    if cache:
        save_state_atomic(folder / MODEL_FILE, model.state_dict())
        record[MODEL_DIGEST] = file_digest(folder / MODEL_FILE)
        write_json_atomic(folder / RECORD_FILE, record)
        (folder / CHECKPOINT_FILE).unlink(missing_ok=True)
    return ExperimentResult(cfg, record, model, data)


def record_row(record: dict[str, Any]) -> dict[str, Any]:
    """A flat table row of a record: the config fields, ACC, ASR and each protocol's ACC/ASR."""
    cfg = record["config"]
    row: dict[str, Any] = {k: v for k, v in cfg.items() if not isinstance(v, (dict, list))}
    row.update({f"attack.{k}": v for k, v in cfg["attack_params"].items()})
    row.update({f"defense.{k}": v for k, v in cfg["defense_params"].items()})
    metrics = record["metrics"]
    row["acc"] = metrics["acc"]
    row["asr"] = metrics.get("asr")
    for protocol, values in metrics.get("protocols", {}).items():
        row[f"acc_{protocol}"] = values["acc"]
        row[f"asr_{protocol}"] = values["asr"]
    row["train_s"] = record["timings"]["train_s"]
    row["key"] = record["key"]
    return row
