"""pyseg.data.download with a loopback HTTP server and archives built in tmp_path: layout, sha256, failures, safety."""

from __future__ import annotations

import functools
import hashlib
import io
import socket
import tarfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from pyseg.data.download import DownloadError, download_dataset, safe_extract, sha256_of

DATASET_FILES = {"images/train/a.jpg": b"jpeg-bytes", "labels/train/a.txt": b"0 0.1 0.1 0.5 0.1 0.5 0.5\n"}


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/served on 127.0.0.1; .url(name) gives a file's URL, .requests the paths asked for."""
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, format, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    port = httpd.server_address[1]
    yield SimpleNamespace(root=root, requests=requests, url=lambda name: f"http://127.0.0.1:{port}/{name}")
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zip_file:
        for name, data in files.items():
            zip_file.writestr(name, data)
    return path


def make_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar_file:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar_file.addfile(info, io.BytesIO(data))
    return path


def make_tar_link(path: Path, name: str, linkname: str, kind: bytes) -> Path:
    with tarfile.open(path, "w") as tar_file:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        tar_file.addfile(info)
    return path


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.partial-")]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_zip_with_single_top_level_folder_is_unwrapped(server, tmp_path):
    make_zip(server.root / "coco128-seg.zip", {f"coco128-seg/{k}": v for k, v in DATASET_FILES.items()})
    target = tmp_path / "datasets" / "coco128-seg"

    assert download_dataset(server.url("coco128-seg.zip"), target, progress=True) == target

    assert read_tree(target) == DATASET_FILES
    assert not (target / "coco128-seg").exists()
    assert server.requests == ["/coco128-seg.zip"]
    assert leftovers(target.parent, target.name) == []


def test_tar_gz_without_wrapper_folder_is_extracted_as_is(server, tmp_path):
    files = {**DATASET_FILES, "other/readme.txt": b"hi"}
    make_tar(server.root / "data.tar.gz", files)
    target = tmp_path / "mydata"

    download_dataset(server.url("data.tar.gz"), target, progress=False)

    assert read_tree(target) == files


def test_top_level_folder_with_another_name_is_kept(server, tmp_path):
    make_zip(server.root / "x.zip", {f"other-name/{k}": v for k, v in DATASET_FILES.items()})
    target = tmp_path / "coco128-seg"

    download_dataset(server.url("x.zip"), target, progress=False)

    assert read_tree(target) == {f"other-name/{k}": v for k, v in DATASET_FILES.items()}


def test_correct_sha256_passes_and_several_archives_merge(server, tmp_path):
    images = make_zip(server.root / "images.zip", {"images/a.jpg": b"img"})
    labels = make_tar(server.root / "labels.tar.bz2", {"labels/a.txt": b"0 0 0 1 0 1 1"}, mode="w:bz2")
    target = tmp_path / "ds"

    download_dataset(
        [server.url("images.zip"), server.url("labels.tar.bz2")],
        target,
        sha256=[sha256_of(images), sha256_of(labels).upper()],
        progress=False,
    )

    assert read_tree(target) == {"images/a.jpg": b"img", "labels/a.txt": b"0 0 0 1 0 1 1"}


def test_wrong_sha256_raises_and_leaves_nothing(server, tmp_path):
    archive = make_zip(server.root / "ds.zip", DATASET_FILES)
    actual = sha256_of(archive)
    wrong = "0" * 64
    target = tmp_path / "ds"

    with pytest.raises(DownloadError) as excinfo:
        download_dataset(server.url("ds.zip"), target, sha256=wrong, progress=False)

    message = str(excinfo.value)
    assert wrong in message and actual in message and server.url("ds.zip") in message
    assert "outdated" in message
    assert not target.exists()
    assert leftovers(tmp_path, "ds") == []


def test_sha256_of_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 9000  # spans several read chunks
    path.write_bytes(data)
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()


def test_unreachable_url_says_where_to_put_the_data(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/x.zip"
    target = tmp_path / "coco128-seg"

    with pytest.raises(DownloadError) as excinfo:
        download_dataset(url, target, progress=False, timeout_s=5.0)

    message = str(excinfo.value)
    assert url in message and str(target) in message and "by hand" in message
    assert str(target / "images") in message and "path:" in message
    assert not target.exists()
    assert leftovers(tmp_path, target.name) == []


def test_http_error_is_reported_with_status(server, tmp_path):
    target = tmp_path / "ds"
    with pytest.raises(DownloadError, match="HTTP 404") as excinfo:
        download_dataset(server.url("missing.zip"), target, progress=False)
    assert str(target) in str(excinfo.value)
    assert not target.exists()


def test_existing_non_empty_target_is_returned_without_request(server, tmp_path):
    make_zip(server.root / "ds.zip", DATASET_FILES)
    target = tmp_path / "ds"
    (target / "images").mkdir(parents=True)
    (target / "images" / "mine.jpg").write_bytes(b"keep")

    assert download_dataset(server.url("ds.zip"), target, sha256="0" * 64, progress=False) == target

    assert server.requests == []
    assert read_tree(target) == {"images/mine.jpg": b"keep"}


def test_existing_empty_target_is_filled(server, tmp_path):
    make_zip(server.root / "ds.zip", DATASET_FILES)
    target = tmp_path / "ds"
    target.mkdir()

    download_dataset(server.url("ds.zip"), target, progress=False)

    assert read_tree(target) == DATASET_FILES


def test_file_url_and_plain_path_work(tmp_path):
    archive = make_zip(tmp_path / "ds.zip", {f"ds/{k}": v for k, v in DATASET_FILES.items()})

    from_url = download_dataset(archive.as_uri(), tmp_path / "a" / "ds", sha256=sha256_of(archive), progress=False)
    from_path = download_dataset(str(archive), tmp_path / "b" / "ds", progress=False)

    assert read_tree(from_url) == DATASET_FILES
    assert read_tree(from_path) == DATASET_FILES
    assert archive.is_file()  # a local archive is used in place, never deleted


def test_missing_local_archive_raises(tmp_path):
    with pytest.raises(DownloadError, match="by hand"):
        download_dataset(str(tmp_path / "absent.zip"), tmp_path / "ds", progress=False)


def test_mismatched_sha256_count_raises(tmp_path):
    with pytest.raises(DownloadError, match="one sha256 per URL"):
        download_dataset(["a.zip", "b.zip"], tmp_path / "ds", sha256=["0" * 64], progress=False)


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize("member", ["../evil.txt", "sub/../../evil.txt", "ABSOLUTE"])
def test_safe_extract_rejects_escaping_members(tmp_path, kind, member):
    evil = tmp_path / "evil.txt"
    name = str(evil) if member == "ABSOLUTE" else member
    files = {"ok.txt": b"fine", name: b"pwned"}
    archive = make_zip(tmp_path / "a.zip", files) if kind == "zip" else make_tar(tmp_path / "a.tar", files, mode="w")
    destination = tmp_path / "dest"

    with pytest.raises(DownloadError) as excinfo:
        safe_extract(archive, destination)

    assert name in str(excinfo.value) and str(archive) in str(excinfo.value)
    assert not evil.exists()
    assert not (destination / "ok.txt").exists()  # checked before anything is written


@pytest.mark.parametrize(
    "name, linkname, kind",
    [
        ("link", "../outside", tarfile.SYMTYPE),
        ("sub/link", "../../outside", tarfile.SYMTYPE),
        ("link", "/etc/passwd", tarfile.SYMTYPE),
        ("hard", "../outside", tarfile.LNKTYPE),
    ],
)
def test_safe_extract_rejects_links_pointing_outside(tmp_path, name, linkname, kind):
    archive = make_tar_link(tmp_path / "a.tar", name, linkname, kind)
    destination = tmp_path / "dest"

    with pytest.raises(DownloadError, match="refusing") as excinfo:
        safe_extract(archive, destination)

    assert repr(name) in str(excinfo.value)
    assert not (destination / name).is_symlink() and not (destination / name).exists()


def test_safe_extract_rejects_device_files(tmp_path):
    archive = make_tar_link(tmp_path / "a.tar", "null", "", tarfile.CHRTYPE)
    with pytest.raises(DownloadError, match="device"):
        safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest" / "null").exists()


def test_safe_extract_rejects_member_through_existing_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    destination = tmp_path / "dest"
    destination.mkdir()
    (destination / "escape").symlink_to(outside)
    archive = make_zip(tmp_path / "a.zip", {"escape/evil.txt": b"pwned"})

    with pytest.raises(DownloadError, match="outside"):
        safe_extract(archive, destination)
    assert not (outside / "evil.txt").exists()


def test_safe_extract_keeps_symlinks_inside(tmp_path):
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar_file:
        info = tarfile.TarInfo("data/real.txt")
        info.size = 4
        tar_file.addfile(info, io.BytesIO(b"real"))
        link = tarfile.TarInfo("data/alias.txt")
        link.type = tarfile.SYMTYPE
        link.linkname = "real.txt"
        tar_file.addfile(link)

    safe_extract(archive, tmp_path / "dest")

    assert (tmp_path / "dest" / "data" / "alias.txt").read_bytes() == b"real"


def test_safe_extract_rejects_unknown_type_listing_supported(tmp_path):
    archive = tmp_path / "data.rar"
    archive.write_bytes(b"Rar!\x1a\x07\x00 not really")
    with pytest.raises(DownloadError, match=r"\.zip.*\.tar\.gz"):
        safe_extract(archive, tmp_path / "dest")


def test_download_of_corrupt_or_malicious_archive_leaves_nothing(server, tmp_path):
    (server.root / "page.zip").write_text("<html>not found</html>")
    make_zip(server.root / "evil.zip", {"ds/ok.txt": b"fine", "../evil.txt": b"pwned"})
    target = tmp_path / "ds"

    with pytest.raises(DownloadError, match="corrupt"):
        download_dataset(server.url("page.zip"), target, progress=False)
    with pytest.raises(DownloadError, match="evil.txt"):
        download_dataset(server.url("evil.zip"), target, progress=False)

    assert not target.exists()
    assert not (tmp_path / "evil.txt").exists()
    assert leftovers(tmp_path, "ds") == []
