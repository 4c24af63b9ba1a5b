"""Dataset YAML resolution: `--data` (a YAML path, a built-in name or a dataset folder) -> DatasetConfig.

YAML fields (Ultralytics style): `path` (dataset root), `train`, `val`, optional `test` (each a folder, a .txt
list of image paths, or a list of those), `names` (dict or list) or `nc`, optional `download` (URL or list of
URLs of zip/tar archives) with optional `sha256`, or `generate` (a built-in generator, e.g. shapes-seg).
A relative `path` resolves against the YAML's own folder first, then against the datasets folder
($PYSEG_DATASETS_DIR, default ~/.cache/pyseg/datasets). pyseg never runs code from a YAML.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from pyseg.errors import UserError
from pyseg.files import read_yaml_mapping

BUILTIN_DATASETS = ("shapes-seg.yaml", "coco128-seg.yaml")
DEFAULT_DATASET = "shapes-seg.yaml"
KNOWN_KEYS = {"path", "train", "val", "test", "names", "nc", "download", "sha256", "generate"}
SPLITS = ("train", "val", "test")


class DatasetConfigError(UserError, ValueError):
    """A dataset YAML or --data value that pyseg cannot use; the message says how to fix it."""


@dataclass
class DatasetConfig:
    """A resolved dataset: absolute root, per-split image sources, class names."""

    root: Path  # absolute dataset folder
    splits: dict[str, list[Path]]  # split -> absolute folders / .txt lists / image files
    names: list[str]  # class names, index = class id
    yaml_path: Path | None = None  # the YAML it came from (None for a bare folder)
    extras: dict = field(default_factory=dict)  # download / generate settings as given

    @property
    def nc(self) -> int:
        return len(self.names)


def datasets_dir() -> Path:
    """Where datasets are downloaded or generated: $PYSEG_DATASETS_DIR or ~/.cache/pyseg/datasets."""
    return Path(os.environ.get("PYSEG_DATASETS_DIR", Path.home() / ".cache" / "pyseg" / "datasets")).expanduser()


def builtin_yaml(name: str) -> Path | None:
    """Path of a built-in dataset YAML by name (with or without .yaml), or None."""
    filename = name if name.endswith(".yaml") else f"{name}.yaml"
    if filename not in BUILTIN_DATASETS:
        return None
    return Path(str(resources.files("pyseg.data") / "builtin" / filename))


def _parse_names(raw: dict, source: str) -> list[str]:
    names, nc = raw.get("names"), raw.get("nc")
    if names is None:
        if not isinstance(nc, int) or nc <= 0:
            raise DatasetConfigError(f"{source}: give `names` (a list or a dict id -> name) or a positive `nc`")
        return [f"class{i}" for i in range(nc)]
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError) as error:
            raise DatasetConfigError(f"{source}: `names` keys must be class ids 0..n-1, got {list(names)}") from error
        if ids != list(range(len(ids))):
            raise DatasetConfigError(f"{source}: `names` ids must be 0..{len(ids) - 1} without gaps, got {ids}")
        names = [str(names[k] if k in names else names[str(k)]) for k in ids]
    elif isinstance(names, list):
        names = [str(n) for n in names]
    else:
        raise DatasetConfigError(f"{source}: `names` must be a list or a dict id -> name, got {type(names).__name__}")
    if not names:
        raise DatasetConfigError(f"{source}: `names` is empty")
    if nc is not None and nc != len(names):
        raise DatasetConfigError(f"{source}: nc = {nc} but `names` has {len(names)} entries")
    return names


def _check_keys(raw: dict, source: str) -> None:
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), sorted(KNOWN_KEYS), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise DatasetConfigError(
            f"{source}: unknown key(s) {', '.join(hints)}; known keys are {', '.join(sorted(KNOWN_KEYS))}"
        )
    for key in ("train", "val"):
        if key not in raw:
            raise DatasetConfigError(f"{source}: missing `{key}` (a folder, a .txt list of images or a list)")
    download = raw.get("download")
    if download is not None:
        urls = download if isinstance(download, list) else [download]
        for url in urls:
            if not isinstance(url, str) or "\n" in url.strip() or " " in url.strip():
                raise DatasetConfigError(
                    f"{source}: `download` must be a URL or a list of URLs of zip/tar archives; pyseg never runs "
                    "code from a YAML. Place the data by hand and remove `download`."
                )


def _resolve_root(raw_path, yaml_dir: Path | None) -> Path:
    if raw_path in (None, ""):
        return (yaml_dir or Path.cwd()).resolve()
    path = Path(str(raw_path)).expanduser()
    if path.is_absolute():
        return path
    if yaml_dir is not None and (yaml_dir / path).exists():
        return (yaml_dir / path).resolve()
    return (datasets_dir() / path).resolve()


def _split_sources(value, root: Path, split: str, source: str) -> list[Path]:
    items = value if isinstance(value, list) else [value]
    paths = []
    for item in items:
        if not isinstance(item, str | os.PathLike) or not str(item).strip():
            raise DatasetConfigError(f"{source}: `{split}` entries must be paths, got {item!r}")
        path = Path(item).expanduser()
        paths.append(path if path.is_absolute() else root / path)
    return paths


def load_dataset_yaml(yaml_path: Path) -> DatasetConfig:
    """Reads a dataset YAML (no download or generation: see resolve_dataset)."""
    source = str(yaml_path)
    raw = read_yaml_mapping(yaml_path, "dataset YAML", DatasetConfigError)
    _check_keys(raw, source)
    if raw.get("path") is not None and not isinstance(raw.get("path"), str | int | float):
        raise DatasetConfigError(
            f"{yaml_path}: `path` must be one folder (the dataset root), got {raw.get('path')!r}; list several image "
            "folders under `train:` / `val:` instead"
        )
    root = _resolve_root(raw.get("path"), yaml_path.parent)
    splits = {s: _split_sources(raw[s], root, s, source) for s in SPLITS if raw.get(s) is not None}
    extras = {k: raw[k] for k in ("download", "sha256", "generate") if raw.get(k) is not None}
    return DatasetConfig(root, splits, _parse_names(raw, source), yaml_path.resolve(), extras)


def _folder_config(folder: Path) -> DatasetConfig:
    """A dataset folder: its data.yaml / dataset.yaml, else images/{train,val} (or images/) + labels/."""
    for name in ("data.yaml", "dataset.yaml"):
        if (folder / name).is_file():
            return load_dataset_yaml(folder / name)
    images = folder / "images"
    if not images.is_dir():
        raise DatasetConfigError(
            f"{folder} is a folder without data.yaml and without images/: give a dataset YAML, or lay the folder "
            "out as images/{train,val}/*.jpg with labels/{train,val}/*.txt"
        )
    splits = {s: [images / s] for s in ("train", "val") if (images / s).is_dir()}
    if not splits:
        splits = {"train": [images], "val": [images]}
    splits.setdefault("val", splits["train"])
    splits.setdefault("train", splits["val"])
    highest, where, used = -1, "", set()
    for label in sorted((folder / "labels").rglob("*.txt")):
        if not label.is_file():
            continue  # a FIFO or device named *.txt is never read (it could block); verification names it
        for number, line in enumerate(label.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
            head = line.split(maxsplit=1)
            if head and head[0].isascii() and head[0].isdigit():  # ASCII digits only: '²'.isdigit() is True
                class_id = int(head[0])
                used.add(class_id)
                if class_id > highest:
                    highest, where = class_id, f"{label}:{number}"
    names = [f"class{i}" for i in range(max(highest + 1, 1))]
    if highest >= 0 and len(used) < len(names):
        print(
            f"dataset {folder}: the labels use {len(used)} of the {len(names)} class ids their largest one implies "
            f"(class {highest} at {where}); the model gets {len(names)} classes. Give a dataset YAML with `names:` "
            "to set the classes",
            file=sys.stderr,
        )
    return DatasetConfig(folder.resolve(), splits, names, None, {})


def _materialize(config: DatasetConfig) -> None:
    """Downloads or generates the dataset when its root is missing."""
    root = config.root
    if root.is_dir() and any(root.iterdir()):
        return
    generator = config.extras.get("generate")
    if generator is not None:
        if generator != "shapes-seg":
            raise DatasetConfigError(f"{config.yaml_path}: unknown generator {generator!r}; pyseg has 'shapes-seg'")
        from pyseg.data.synthetic import generate_shapes_seg

        root.parent.mkdir(parents=True, exist_ok=True)
        generate_shapes_seg(root)
        return
    download = config.extras.get("download")
    if download is None:
        raise DatasetConfigError(
            f"dataset folder {root} does not exist (from {config.yaml_path or 'the --data folder'}) and the YAML has "
            "no `download`: place the data there (images/ and labels/) or fix `path:`"
        )
    from pyseg.data.download import download_dataset

    root.parent.mkdir(parents=True, exist_ok=True)
    download_dataset(download, root, config.extras.get("sha256"))


def resolve_dataset(data: str | os.PathLike | None = None, *, materialize: bool = True) -> DatasetConfig:
    """Resolves --data to a DatasetConfig; downloads or generates a missing dataset when materialize is set.

    data: a path to a dataset YAML, a built-in name (shapes-seg.yaml, coco128-seg.yaml; default shapes-seg.yaml),
    or a dataset folder.
    """
    data = DEFAULT_DATASET if data in (None, "") else data
    path = Path(data).expanduser()
    if path.is_dir():
        config = _folder_config(path)
    elif path.is_file():
        config = load_dataset_yaml(path)
    else:
        builtin = builtin_yaml(str(data)) if path.parent == Path(".") else None
        if builtin is None:
            raise DatasetConfigError(
                f"--data {data}: no such file or folder, and not a built-in dataset "
                f"(built-in: {', '.join(BUILTIN_DATASETS)})"
            )
        config = load_dataset_yaml(builtin)
    if materialize:
        _materialize(config)
    return config
