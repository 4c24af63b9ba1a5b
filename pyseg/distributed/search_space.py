"""Search spaces: read from YAML ({key: {distribution: args}} or a fixed value), checked at every extreme against the
training config before any trial runs, and turned into Ray Tune domains."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pyseg.config import TrainConfig
from pyseg.errors import ConfigError
from pyseg.files import read_yaml_mapping

DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2, "choice": None}


# Keys that describe the run rather than the model; the tuner sets them itself.
NOT_SEARCHABLE = {"data", "project", "name", "exist_ok", "resume", "device", "workers", "val", "val_period", "epochs"}


# Values a trial can change between two epochs and go on training (PBT perturbs them; a trial that exploits another
# trial's checkpoint continues it with its own): learning rates, loss gains, augmentation.
MUTABLE = {
    "lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "box", "cls", "dfl", "mask", "hsv_h", "hsv_s",
    "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "flipud", "fliplr", "mosaic", "mixup",
    "copy_paste",
}  # fmt: skip


class SearchSpaceError(ConfigError):
    """A search-space file is malformed; the message names the file and the key."""


class SearchSpace(dict):
    """{key: (distribution, arguments)}, distribution "fixed" for constants; path: the file it was read from."""

    def __init__(self, entries: dict, path: Path | None = None):
        super().__init__(entries)
        self.path = path


def load_search_space(path: str | Path, base: TrainConfig | None = None) -> SearchSpace:
    """Reads and checks a search-space YAML: {key: (distribution, arguments)}, distribution "fixed" for constants.

    Every extreme of every dimension (both bounds, every choice) must make a valid TrainConfig: alone, or on top of
    base when it is given (run_tune checks again on top of its base), so that no trial starts with an invalid value.
    """
    path = Path(path)
    return parse_search_space(read_yaml_mapping(path, "search space", SearchSpaceError), path, base)


def parse_search_space(raw: dict, path: Path | str, base: TrainConfig | None = None) -> SearchSpace:
    """The checked SearchSpace of raw, a space YAML's mapping (read from path, which messages name)."""
    if not raw:
        raise SearchSpaceError(f"search space {path} must map TrainConfig keys to distributions (see tune/full.yaml)")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    space = SearchSpace({}, path)
    for key, entry in raw.items():
        where = f"search space {path}, key {key!r}"
        if key not in known:
            raise SearchSpaceError(f"{where}: not a training config key (see python -m pyseg.train --help)")
        if key in NOT_SEARCHABLE:
            raise SearchSpaceError(f"{where}: describes the run, not the model; set it on the command line instead")
        if not isinstance(entry, dict):
            space[key] = ("fixed", entry)
            continue
        if len(entry) != 1 or next(iter(entry)) not in DISTRIBUTIONS:
            raise SearchSpaceError(
                f"{where}: give a fixed value or exactly one of {', '.join(DISTRIBUTIONS)}, got {entry!r}"
            )
        kind, args = next(iter(entry.items()))
        if not isinstance(args, list) or not args:
            raise SearchSpaceError(f"{where}: {kind} takes a list, got {args!r}")
        count = DISTRIBUTIONS[kind]
        if count is not None:
            if len(args) != count or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
                raise SearchSpaceError(f"{where}: {kind} takes {count} numbers, got {args!r}")
            low, high = args[0], args[1]
            if not low < high:
                raise SearchSpaceError(f"{where}: {kind} needs low < high, got {args!r}")
            if kind == "loguniform" and low <= 0:
                raise SearchSpaceError(f"{where}: loguniform needs low > 0, got {args!r}")
            if kind == "quniform" and args[2] <= 0:
                raise SearchSpaceError(f"{where}: quniform needs q > 0, got {args!r}")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise SearchSpaceError(f"{where}: randint takes integers, got {args!r}")
        space[key] = (kind, args)
    check_search_space(space, base)
    return space


def space_as_yaml(space: dict[str, tuple[str, object]]) -> dict:
    """The space as its YAML file writes it ({key: {distribution: args}}, fixed values as they are)."""
    return {key: args if kind == "fixed" else {kind: args} for key, (kind, args) in space.items()}


def extremes(kind: str, args) -> list[tuple[str, object]]:
    """The values a dimension can take at its edges, each named: [("uniform low 0.1", 0.1), ...]."""
    if kind == "fixed":
        return [(f"value {args!r}", args)]
    if kind == "choice":
        return [(f"choice {value!r}", value) for value in args]
    low, high = args[0], args[1]
    if kind == "randint":  # Ray's randint excludes high
        return [(f"randint low {low!r}", low), (f"randint high - 1 = {high - 1!r}", high - 1)]
    if kind == "quniform":  # Ray rounds each sample to a multiple of q
        q = args[2]
        low_q, high_q = round(low / q) * q, round(high / q) * q
        return [(f"quniform low (to q) {low_q!r}", low_q), (f"quniform high (to q) {high_q!r}", high_q)]
    return [(f"{kind} low {low!r}", low), (f"{kind} high {high!r}", high)]


def check_search_space(space: dict[str, tuple[str, object]], base: TrainConfig | None = None) -> None:
    """Raises SearchSpaceError, naming the space file, the key and the bound, when an extreme of a dimension (see
    extremes), alone or on top of base, is not a valid TrainConfig (make_config's checks: types and ranges)."""
    source = getattr(space, "path", None) or "(given as a dict)"
    base = base if base is not None else TrainConfig()
    for key, (kind, args) in space.items():
        for bound, value in extremes(kind, args):
            try:
                base.updated(**{key: value})
            except ValueError as error:
                raise SearchSpaceError(
                    f"search space {source}, key {key!r}: {bound} is not a valid training value: {error}"
                ) from error


def to_tune_space(space: dict[str, tuple[str, object]]) -> dict:
    """Ray Tune domains for a checked search space."""
    from ray import tune

    build = {
        "fixed": lambda a: a,
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "quniform": lambda a: tune.quniform(*a),
        "randint": lambda a: tune.randint(*a),
        "choice": lambda a: tune.choice(a),
    }
    return {key: build[kind](args) for key, (kind, args) in space.items()}


def pbt_mutations(space: dict) -> dict:
    """Tune domains of the searched values PBT may change between epochs (MUTABLE); SearchSpaceError when none."""
    evolving = {key: entry for key, entry in space.items() if key in MUTABLE and entry[0] != "fixed"}
    mutations = to_tune_space(evolving)
    if not mutations:
        source = getattr(space, "path", None) or "(given as a dict)"
        raise SearchSpaceError(
            f"--scheduler pbt: search space {source} searches nothing PBT can change while a trial trains; search "
            f"at least one of {', '.join(sorted(MUTABLE))}"
        )
    return mutations


def clip_to_space(config: dict, space: dict) -> dict:
    """config with every value PBT perturbed (x1.2, x0.8) brought back inside its dimension's bounds, so that a
    perturbed trial never trains with a value the space does not allow (mosaic 1.2, an integer as a float)."""
    clipped = dict(config)
    for key, (kind, args) in space.items():
        if key not in clipped or kind in ("fixed", "choice"):
            continue
        value = min(max(clipped[key], args[0]), args[1] - 1 if kind == "randint" else args[1])
        clipped[key] = int(round(value)) if kind == "randint" else value
    return clipped
