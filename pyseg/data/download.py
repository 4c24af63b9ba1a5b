"""Dataset download: fetch archives (HTTP(S), file://, local path), check sha256, extract safely, move atomically.

A download either produces the complete dataset folder or leaves nothing behind: everything happens in a temporary
folder next to the target (same filesystem) that is renamed into place at the end and removed on any failure.
Nothing from an archive is ever executed; members that would land outside the destination are refused.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from pyseg.errors import UserError

CHUNK_BYTES = 1 << 20  # read/write/hash granularity (bytes)
ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
SUPPORTED_TYPES = ", ".join(ZIP_SUFFIXES + TAR_SUFFIXES)
NETWORK_SCHEMES = ("http", "https", "ftp")
IGNORED_TOP_LEVEL = ("__MACOSX",)  # resource-fork folders that macOS zips add; not part of the dataset


class DownloadError(UserError, RuntimeError):
    """A dataset could not be downloaded, verified or extracted; the message says what to do next."""


def download_dataset(
    urls: str | list[str],
    target: Path,
    sha256: str | list[str] | None = None,
    *,
    progress: bool = True,
    timeout_s: float = 30.0,
) -> Path:
    """Downloads archive(s) at urls and extracts them into the folder target (atomically); returns target.

    urls: http(s)/ftp URLs, file:// URLs or local paths of .zip / .tar(.gz/.bz2/.xz) archives; several archives are
    extracted into the same folder. sha256: one hex digest per URL, or None to skip the check. An archive holding a
    single top-level folder named target.name is unwrapped (coco128-seg.zip with coco128-seg/images/... gives
    target/images/...). When target already exists and is non-empty, it is returned without any download.
    timeout_s: seconds to wait for the connection and for each read.
    """
    target = Path(target).expanduser()
    url_list = [urls] if isinstance(urls, str) else list(urls)
    if not url_list:
        raise DownloadError(f"no download URL given for {target.absolute()}; add one to the dataset YAML's download:")
    if sha256 is None:
        hash_list: list[str | None] = [None] * len(url_list)
    else:
        hash_list = [sha256] if isinstance(sha256, str) else list(sha256)
        if len(hash_list) != len(url_list):
            raise DownloadError(
                f"got {len(url_list)} URL(s) but {len(hash_list)} sha256 value(s) for {target.absolute()}; "
                "give one sha256 per URL (or none at all)"
            )
    if _is_non_empty_dir(target):
        return target
    if target.exists() and not target.is_dir():
        raise DownloadError(f"{target.absolute()} exists and is not a folder; move it away so the dataset can go there")

    target.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        extracted = work_dir / "extracted"
        extracted.mkdir()
        for index, (url, expected) in enumerate(zip(url_list, hash_list, strict=True)):
            archive, is_temporary = _fetch(url, work_dir / "downloads", index, target, progress, timeout_s)
            if expected is not None:
                _check_sha256(archive, url, expected)
            safe_extract(archive, extracted)
            if is_temporary:
                archive.unlink()  # keep peak disk use near one archive plus the extracted data
        result = _unwrap_single_folder(extracted, target.name)
        if not any(result.iterdir()):
            raise DownloadError(
                f"the archive(s) {', '.join(url_list)} hold no files; check the dataset YAML's download:"
            )
        _move_into_place(result, target)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return target


def safe_extract(archive: Path, destination: Path) -> None:
    """Extracts a .zip or .tar(.gz/.bz2/.xz) archive into destination, refusing any member that would escape it.

    Refused (DownloadError naming the archive and the member): absolute paths, `..` components, paths resolving outside
    destination, tar symlinks/hardlinks pointing outside, device files. All members are checked before any is written.
    """
    archive = Path(archive)
    destination = Path(destination)
    kind = _archive_kind(archive)
    destination.mkdir(parents=True, exist_ok=True)
    root = destination.resolve()
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zip_file:
                for info in zip_file.infolist():
                    _check_member_path(archive, info.filename, root)
                zip_file.extractall(root)
        else:
            with tarfile.open(archive, "r:*") as tar_file:
                members = tar_file.getmembers()
                for member in members:
                    _check_tar_member(archive, member, root)
                if hasattr(tarfile, "data_filter"):
                    tar_file.extractall(root, members=members, filter="data")
                else:  # Python < 3.10.12 / 3.11.4: our own checks above are the only guard
                    tar_file.extractall(root, members=members)
    except DownloadError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as error:
        raise DownloadError(
            f"could not extract {archive} ({type(error).__name__}: {error}); the file may be corrupt or not a "
            f"{kind} archive (an HTML error page?): delete it and download it again"
        ) from error


def sha256_of(path: Path) -> str:
    """Hex SHA-256 digest of the file at path (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _manual_hint(target: Path) -> str:
    target = target.absolute()
    return (
        f"pyseg expected the dataset in {target}. Without internet, download the archive elsewhere and extract it "
        f"by hand so that {target / 'images'} and {target / 'labels'} exist, or point the YAML's path: at a copy "
        "you already have."
    )


def _fetch(
    url: str, download_dir: Path, index: int, target: Path, progress: bool, timeout_s: float
) -> tuple[Path, bool]:
    """(archive path, whether it is a temporary copy to delete); local archives are used in place."""
    parsed = urllib.parse.urlparse(url)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise DownloadError(f"file:// URL {url} names host {parsed.netloc!r}; only local files are supported")
        local = Path(urllib.request.url2pathname(parsed.path))
    elif scheme in NETWORK_SCHEMES:
        return _download(url, download_dir, index, target, progress, timeout_s), True
    elif len(scheme) > 1:
        raise DownloadError(
            f"unsupported URL scheme in {url}; use http(s)://, ftp://, file:// or a local path. {_manual_hint(target)}"
        )
    else:  # a plain path (a one-letter scheme is a Windows drive)
        local = Path(url).expanduser()
    if not local.is_file():
        raise DownloadError(f"could not read the archive {local} (no such file). {_manual_hint(target)}")
    return local, False


def _download(url: str, download_dir: Path, index: int, target: Path, progress: bool, timeout_s: float) -> Path:
    """Streams url into download_dir in chunks; any network failure becomes a DownloadError with the manual hint."""
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "archive"
    download_dir.mkdir(parents=True, exist_ok=True)
    path = download_dir / f"{index}-{name}"
    request = urllib.request.Request(url, headers={"User-Agent": "pyseg"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response, open(path, "wb") as file:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not progress, leave=False
            ) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    file.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise DownloadError(
                f"could not download {url} (connection closed after {received} of {total} bytes). "
                f"Try again. {_manual_hint(target)}"
            )
    except urllib.error.HTTPError as error:
        raise DownloadError(
            f"could not download {url} (HTTP {error.code} {error.reason}). {_manual_hint(target)}"
        ) from error
    except urllib.error.URLError as error:
        raise DownloadError(f"could not download {url} ({error.reason}). {_manual_hint(target)}") from error
    except TimeoutError as error:
        raise DownloadError(
            f"could not download {url} (no response within {timeout_s:g} s). {_manual_hint(target)}"
        ) from error
    except (OSError, http.client.HTTPException) as error:
        raise DownloadError(
            f"could not download {url} ({type(error).__name__}: {error}). {_manual_hint(target)}"
        ) from error
    return path


def _check_sha256(archive: Path, url: str, expected: str) -> None:
    actual = sha256_of(archive)
    if actual != expected.strip().lower():
        raise DownloadError(
            f"sha256 mismatch for {url}: expected {expected.strip().lower()}, got {actual}. The file may be corrupt "
            "(download it again) or the dataset YAML's sha256 is outdated (fix it after checking the source)."
        )


def _archive_kind(archive: Path) -> str:
    """'zip' or 'tar', from the file name or, failing that, from the file's content."""
    name = archive.name.lower()
    if name.endswith(ZIP_SUFFIXES):
        return "zip"
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if archive.is_file():
        if zipfile.is_zipfile(archive):
            return "zip"
        if tarfile.is_tarfile(archive):
            return "tar"
    raise DownloadError(
        f"{archive} is not a supported archive; supported types: {SUPPORTED_TYPES}. Extract it by hand instead."
    )


def _is_inside(path: str, root: Path) -> bool:
    root_str = str(root)
    return path == root_str or path.startswith(root_str.rstrip(os.sep) + os.sep)


def _is_absolute(name: str) -> bool:
    """POSIX root or Windows drive prefix, on any platform (name uses '/' separators)."""
    return name.startswith("/") or (len(name) >= 2 and name[0].isalpha() and name[1] == ":")


def _check_member_path(archive: Path, name: str, root: Path) -> None:
    """Refuses a member name that is absolute, has a `..` component or resolves outside root."""
    portable = name.replace("\\", "/")
    if _is_absolute(portable):
        raise DownloadError(f"refusing to extract {archive}: member {name!r} is an absolute path")
    if ".." in portable.split("/"):
        raise DownloadError(f"refusing to extract {archive}: member {name!r} contains '..'")
    joined = os.path.normpath(os.path.join(root, portable))
    resolved = os.path.realpath(joined)  # follows symlinks that already exist under root
    if not (_is_inside(joined, root) and _is_inside(resolved, root)):
        raise DownloadError(f"refusing to extract {archive}: member {name!r} would land outside {root}")


def _check_tar_member(archive: Path, member: tarfile.TarInfo, root: Path) -> None:
    _check_member_path(archive, member.name, root)
    if member.isdev():
        raise DownloadError(f"refusing to extract {archive}: member {member.name!r} is a device file or FIFO")
    if member.issym() or member.islnk():
        link = member.linkname.replace("\\", "/")
        if _is_absolute(link):
            raise DownloadError(
                f"refusing to extract {archive}: link {member.name!r} points to the absolute path {member.linkname!r}"
            )
        # symlinks are relative to the member's folder, hardlinks to the archive root
        base = os.path.dirname(member.name.replace("\\", "/")) if member.issym() else ""
        pointed = os.path.normpath(os.path.join(root, base, link))
        if not (_is_inside(pointed, root) and _is_inside(os.path.realpath(pointed), root)):
            raise DownloadError(
                f"refusing to extract {archive}: link {member.name!r} -> {member.linkname!r} points outside {root}"
            )


def _unwrap_single_folder(extracted: Path, name: str) -> Path:
    """The single top-level folder called name inside extracted, if that is all there is; else extracted."""
    entries = [entry for entry in extracted.iterdir() if entry.name not in IGNORED_TOP_LEVEL]
    if len(entries) == 1 and entries[0].name == name and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return extracted


def _move_into_place(result: Path, target: Path) -> None:
    """Renames result to target; if another process filled target meanwhile, keeps theirs."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    try:
        os.replace(result, target)
    except OSError as error:
        if _is_non_empty_dir(target):
            return  # a concurrent download finished first; its data is complete
        raise DownloadError(
            f"could not move the extracted dataset to {target.absolute()} ({error}); check that the folder is "
            "writable and not in use"
        ) from error


def _is_non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())
