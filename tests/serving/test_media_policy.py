"""`llavakit.serving.media`: image_url loading against a real local HTTP server, real files and real PNG bytes.

The server (``http.server`` on 127.0.0.1) serves an image, redirects, a slow and a dripping endpoint, an endless
body, a non-image and a gzip body, and records every request path, so tests can tell a refusal made before any
request from one made after. Decoded images are compared with PIL's own decoding of the same bytes.
"""

from __future__ import annotations

import base64
import gzip
import io
import queue
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image, ImageFile

from llavakit.errors import ConfigError, LlavakitError
from llavakit.serving.media import DEFAULT_MAX_IMAGE_PIXELS, MediaError, MediaPolicy, load_image_url

LOOPBACK = MediaPolicy(allowed_domains=("127.0.0.1",))
HUGE_BODY_BYTES = 256 * 1024 * 1024
SLOW_SECONDS = 2.0


def _png(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _pil_rgb(data: bytes) -> np.ndarray:
    """The oracle: PIL's own decoding of the same bytes."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG built chunk by chunk: a few hundred KB that declare ``width x height`` pixels."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(1)
    rows_per_call = 1000
    idat = b"".join(compressor.compress(row * rows_per_call) for _ in range(height // rows_per_call))
    idat += compressor.compress(row * (height % rows_per_call)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.png = _png()
        self.paths: list[str] = []
        self.hosts: list[str] = []  # the Host header of each request
        self.huge_sent: queue.Queue[int] = queue.Queue()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.server_port}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        self.server.hosts.append(self.headers.get("Host", ""))
        parts = urlsplit(self.path)
        route = getattr(self, "route_" + parts.path.strip("/").replace("-", "_").replace(".", "_"), None)
        if route is None:
            self.send_error(404)
        else:
            route(parse_qs(parts.query))

    def _headers(self, status: int = 200, **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()

    def _body(self, data: bytes, content_type: str = "image/png", **headers: str) -> None:
        self._headers(200, Content_Type=content_type, Content_Length=str(len(data)), **headers)
        self.wfile.write(data)

    def route_image_png(self, query) -> None:
        self._body(self.server.png)

    def route_redirect(self, query) -> None:
        self._headers(302, Location=query["to"][0], Content_Length="0")

    def route_loop(self, query) -> None:
        self._headers(302, Location="/loop", Content_Length="0")

    def route_slow(self, query) -> None:
        time.sleep(SLOW_SECONDS)
        try:
            self._body(self.server.png)
        except OSError:  # the client gave up long ago
            pass

    def route_drip(self, query) -> None:
        """One byte every 50 ms for 5 s: never idle long enough for a per-read timeout."""
        self._headers(200, Content_Type="image/png", Content_Length="100")
        try:
            for _ in range(100):
                self.wfile.write(b"\x00")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass

    def route_huge(self, query) -> None:
        """A close-delimited body of HUGE_BODY_BYTES (no Content-Length); records how much got written."""
        self._headers(200, Content_Type="image/png")
        block, sent = b"\x00" * 65536, 0
        try:
            while sent < HUGE_BODY_BYTES:
                self.wfile.write(block)
                sent += len(block)
        except OSError:
            pass
        finally:
            self.server.huge_sent.put(sent)

    def route_declared_huge(self, query) -> None:
        self._headers(200, Content_Type="image/png", Content_Length=str(10**9))
        self.wfile.write(b"\x00" * 1024)

    def route_page_html(self, query) -> None:
        self._body(b"<html><body>not an image</body></html>", "text/html")

    def route_gzip(self, query) -> None:
        self._body(gzip.compress(self.server.png), Content_Encoding="gzip")


@pytest.fixture(scope="module")
def server():
    httpd = _Server()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _refused(url: str, policy: MediaPolicy, *fragments: str) -> MediaError:
    with pytest.raises(MediaError) as caught:
        load_image_url(url, policy)
    error = caught.value
    assert error.status == 400 and isinstance(error, LlavakitError) and isinstance(error, ValueError)
    for fragment in fragments:
        assert fragment in str(error), f"{fragment!r} not in {error}"
    return error


# --- http(s) ------------------------------------------------------------------------------------------------------


def test_allowed_host_fetch_decodes_the_served_image(server):
    image = load_image_url(server.url("/image.png"), LOOPBACK)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), _pil_rgb(server.png))


def test_loopback_refused_by_default_without_a_request(server):
    before = list(server.paths)
    error = _refused(server.url("/image.png"), MediaPolicy(), "127.0.0.1", "--allowed-media-domains")
    assert error.code == "invalid_image_url"
    _refused(server.url("/image.png", host="localhost"), LOOPBACK, "'localhost'", "--allowed-media-domains")
    assert server.paths == before


def test_allowed_hostname_fetches(server):
    image = load_image_url(
        server.url("/image.png", host="localhost"), MediaPolicy(allowed_domains=("localhost",))
    )
    np.testing.assert_array_equal(np.asarray(image), _pil_rgb(server.png))


def test_next_address_tried_when_one_is_unreachable(server, monkeypatch):
    real_getaddrinfo = socket.getaddrinfo

    def two_addresses(host, port, *args, **kwargs):
        if host != "dual.test":
            return real_getaddrinfo(host, port, *args, **kwargs)
        # nothing listens on 127.0.0.2 (the server is bound to 127.0.0.1 only): refused, then the next one
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ("127.0.0.2", "127.0.0.1")]

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    image = load_image_url(
        server.url("/image.png", host="dual.test"), MediaPolicy(allowed_domains=("dual.test",))
    )
    np.testing.assert_array_equal(np.asarray(image), _pil_rgb(server.png))


def test_private_addresses_refused_before_any_connection(server, monkeypatch):
    connects: list[object] = []

    def record_connect(sock, address):
        connects.append(address)
        raise OSError("connection attempts are recorded, not made, in this test")

    monkeypatch.setattr(socket.socket, "connect", record_connect)
    policy = MediaPolicy(fetch_timeout_s=30)
    port = server.server_port
    urls = [
        "http://10.0.0.1/image.png",
        "http://169.254.169.254/latest/meta-data/",
        "https://192.168.1.1/a.png",
        "http://100.64.0.1/a.png",  # shared (carrier-grade NAT) space
        "http://224.0.0.1/a.png",
        f"http://0.0.0.0:{port}/image.png",
        f"http://[::1]:{port}/image.png",
        f"http://[::ffff:127.0.0.1]:{port}/image.png",
        f"http://[fe80::1]:{port}/image.png",
        f"http://2130706433:{port}/image.png",  # 127.0.0.1 written as one number: caught after resolution
    ]
    start = time.monotonic()
    for url in urls:
        _refused(url, policy, "non-public address", "--allowed-media-domains")
    assert time.monotonic() - start < 2.0
    assert connects == []
    # Control: the recorder does see the connection an allowed fetch makes.
    _refused(server.url("/image.png"), LOOPBACK, "could not be fetched")
    assert connects


def test_connection_pinned_to_the_checked_address(server, monkeypatch):
    """DNS rebinding: the name answers once, then differently; the fetch must use the first, checked answer."""
    real_getaddrinfo = socket.getaddrinfo
    answers = iter([real_getaddrinfo("127.0.0.1", server.server_port, type=socket.SOCK_STREAM)])

    def rebinding_getaddrinfo(host, *args, **kwargs):
        if host != "rebind.test":
            return real_getaddrinfo(host, *args, **kwargs)
        try:
            return next(answers)
        except StopIteration:
            raise socket.gaierror(socket.EAI_NONAME, "rebind.test answers only once") from None

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    url = server.url("/image.png", host="rebind.test")
    image = load_image_url(url, MediaPolicy(allowed_domains=("rebind.test",)))
    np.testing.assert_array_equal(np.asarray(image), _pil_rgb(server.png))
    assert server.hosts[-1] == f"rebind.test:{server.server_port}"  # the name, not the pinned address


def test_redirects_are_rechecked_at_every_hop(server):
    to_localhost = server.url("/image.png", host="localhost")
    before = len(server.paths)
    _refused(server.url(f"/redirect?to={to_localhost}"), LOOPBACK, "localhost", "--allowed-media-domains")
    _refused(server.url("/redirect?to=http://169.254.169.254/"), LOOPBACK, "169.254.169.254")
    _refused(server.url("/redirect?to=file:///etc/passwd"), LOOPBACK, "'file'", "only http and https")
    assert "/image.png" not in server.paths[before:]
    relative = load_image_url(server.url("/redirect?to=/image.png"), LOOPBACK)
    np.testing.assert_array_equal(np.asarray(relative), _pil_rgb(server.png))


def test_redirect_loop_stops_at_max_redirects(server):
    before = len(server.paths)
    policy = MediaPolicy(allowed_domains=("127.0.0.1",), max_redirects=2)
    _refused(server.url("/loop"), policy, "redirected more than 2 times")
    assert server.paths[before:] == ["/loop"] * 3


def test_slow_server_times_out(server):
    start = time.monotonic()
    _refused(
        server.url("/slow"), MediaPolicy(allowed_domains=("127.0.0.1",), fetch_timeout_s=0.3), "timed out"
    )
    assert time.monotonic() - start < SLOW_SECONDS - 0.5


def test_dripping_body_stopped_by_the_overall_deadline(server):
    start = time.monotonic()
    _refused(
        server.url("/drip"), MediaPolicy(allowed_domains=("127.0.0.1",), fetch_timeout_s=0.5), "timed out"
    )
    assert time.monotonic() - start < 2.0


def test_endless_body_cut_at_max_image_bytes(server):
    policy = MediaPolicy(allowed_domains=("127.0.0.1",), max_image_bytes=1024 * 1024)
    error = _refused(server.url("/huge"), policy, "above this server's limit of 1048576 bytes")
    assert error.code == "image_too_large"
    # The client hung up: the server could write only what socket buffers held, far from the whole body.
    assert server.huge_sent.get(timeout=10) < HUGE_BODY_BYTES // 8


def test_declared_content_length_refused_before_reading(server):
    _refused(server.url("/declared-huge"), LOOPBACK, "1000000000 bytes (Content-Length)")


def test_non_image_failure_and_compressed_responses_refused(server):
    error = _refused(server.url("/page.html"), LOOPBACK, "is not a PNG/JPEG/WEBP/GIF/BMP image")
    assert error.code == "invalid_image_format"
    _refused(server.url("/missing"), LOOPBACK, "HTTP 404")
    _refused(server.url("/gzip"), LOOPBACK, "'gzip'-compressed")


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://example.com/cat.png", "unsupported scheme 'ftp'"),
        ("gopher://example.com/", "unsupported scheme 'gopher'"),
        ("http://[::1/cat.png", "not a valid URL"),
        ("http:///cat.png", "no host"),
        ("", "non-empty string"),
    ],
)
def test_unusable_urls_refused(url, fragment):
    _refused(url, MediaPolicy(), fragment)


def test_concurrent_loads_do_not_interfere(server):
    urls = [server.url("/image.png"), server.url("/missing"), _data_url(_png(8, 6, seed=1))] * 4
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda url: _outcome(url), urls))
    assert results == [(30, 40), "HTTP 404", (6, 8)] * 4


def _outcome(url: str) -> tuple[int, int] | str:
    try:
        return np.asarray(load_image_url(url, LOOPBACK)).shape[:2]
    except MediaError as error:
        return "HTTP 404" if "HTTP 404" in str(error) else str(error)


# --- data URLs ----------------------------------------------------------------------------------------------------


def test_data_url_decodes_like_pil():
    png = _png(17, 9, seed=3)
    image = load_image_url(_data_url(png), MediaPolicy())
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), _pil_rgb(png))


def test_data_url_with_alpha_is_composited_over_white():
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(buffer, "PNG")
    image = load_image_url(_data_url(buffer.getvalue()), MediaPolicy())
    assert image.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("data:image/png;base64,iVBORw0K$$$=", "not valid base64"),
        ("data:image/png;base64,iVBO Rw0K", "not valid base64"),
        ("data:image/png;base64,iVBORw0", "not valid base64"),
        ("data:image/png,iVBORw0KGgo=", "not a base64 data URL"),
        ("data:image/png;base64", "not a base64 data URL"),
        ("data:text/plain;base64,aGVsbG8=", "media type 'text/plain'"),
        ("data:image/png;base64,aGVsbG8gd29ybGQ=", "is not a PNG/JPEG/WEBP/GIF/BMP image"),
    ],
)
def test_bad_data_urls_refused(url, fragment):
    _refused(url, MediaPolicy(), fragment)


def test_data_url_label_is_truncated():
    url = _data_url(b"x" * 3000, "text/plain")
    error = _refused(url, MediaPolicy(), f"({len(url)} chars)")
    assert len(str(error)) < 300


def test_data_url_size_checked_before_decoding():
    png = _png(64, 64)
    error = _refused(_data_url(png), MediaPolicy(max_image_bytes=len(png) // 2), "above this server's limit")
    assert error.code == "image_too_large"
    assert load_image_url(_data_url(png), MediaPolicy(max_image_bytes=len(png))).size == (64, 64)


def test_eps_decoder_is_not_reachable():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    _refused(_data_url(eps, "image/eps"), MediaPolicy(), "is not a PNG/JPEG/WEBP/GIF/BMP image")


# --- decompression bombs ------------------------------------------------------------------------------------------


def test_crafted_bilevel_png_is_a_valid_image():
    png = _bilevel_png(64, 48)
    assert Image.open(io.BytesIO(png)).size == (64, 48)
    image = load_image_url(_data_url(png), MediaPolicy())
    np.testing.assert_array_equal(np.asarray(image), _pil_rgb(png))


def test_decompression_bomb_refused_before_decoding():
    bomb = _bilevel_png(30000, 30000)  # 9e8 pixels: 2.7 GB as RGB
    assert len(bomb) < 1_000_000
    start = time.monotonic()
    error = _refused(_data_url(bomb), MediaPolicy(), "decompression bomb")
    assert error.code == "image_too_large"
    assert time.monotonic() - start < 1.0


def test_header_pixel_count_checked_against_policy():
    # 7000x7000 = 49 MP: above the default limit, below PIL's own bomb threshold, so only our check refuses it.
    assert 7000 * 7000 < Image.MAX_IMAGE_PIXELS
    error = _refused(
        _data_url(_bilevel_png(7000, 7000)), MediaPolicy(), "7000x7000", str(DEFAULT_MAX_IMAGE_PIXELS)
    )
    assert error.code == "image_too_large"
    png = _png(64, 48)
    _refused(_data_url(png), MediaPolicy(max_image_pixels=64 * 48 - 1), "64x48")
    assert load_image_url(_data_url(png), MediaPolicy(max_image_pixels=64 * 48)).size == (64, 48)


@pytest.mark.parametrize("load_truncated", [False, True])
@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_truncated_image_refused(monkeypatch, image_format, load_truncated):
    """Also when some imported library has set PIL's process-wide LOAD_TRUNCATED_IMAGES (lmms-eval does)."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_png(64, 64))).convert("RGB").save(buffer, format=image_format)
    data = buffer.getvalue()
    mime = "image/png" if image_format == "PNG" else "image/jpeg"
    url = f"data:{mime};base64," + base64.b64encode(data[: len(data) // 2]).decode()
    _refused(url, MediaPolicy(), "corrupt or truncated")
    assert load_image_url(f"data:{mime};base64," + base64.b64encode(data).decode(), MediaPolicy()).size == (
        64,
        64,
    )


# --- local files --------------------------------------------------------------------------------------------------


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    (root / "my cat.png").write_bytes(_png(12, 10, seed=4))
    (tmp_path / "secret.png").write_bytes(_png(5, 5, seed=5))
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    (root / "sub" / "inside.png").symlink_to(root / "my cat.png")
    return root


def test_local_files_inside_the_allowed_folder_load(media_root):
    policy = MediaPolicy(allowed_local_path=media_root)
    expected = _pil_rgb((media_root / "my cat.png").read_bytes())
    for url in (
        (media_root / "my cat.png").as_uri(),  # file:// with %20
        f"file://localhost{media_root}/my%20cat.png",
        str(media_root / "my cat.png"),
        "my cat.png",  # relative to the allowed folder
        "sub/inside.png",  # a symlink that stays inside
    ):
        np.testing.assert_array_equal(np.asarray(load_image_url(url, policy)), expected)


def test_local_paths_outside_the_allowed_folder_refused(media_root):
    policy = MediaPolicy(allowed_local_path=media_root)
    secret = media_root.parent / "secret.png"
    for url in (
        secret.as_uri(),
        str(secret),
        "../secret.png",
        "sub/../../secret.png",
        "escape.png",  # symlink pointing out
        (media_root / "escape.png").as_uri(),
        "/etc/passwd",
    ):
        error = _refused(url, policy, "outside the folder this server may read")
        assert str(media_root) not in str(error).replace(url, "")  # the server's folder is not revealed


def test_local_access_off_without_allowed_folder(media_root):
    for url in ((media_root / "my cat.png").as_uri(), str(media_root / "my cat.png"), "my cat.png"):
        _refused(url, MediaPolicy(), "does not read local files", "--allowed-local-media-path")


def test_local_non_files_and_other_hosts_refused(media_root):
    policy = MediaPolicy(allowed_local_path=media_root)
    _refused("sub", policy, "not a regular file")
    _refused("missing.png", policy, "does not exist")
    _refused(f"file://otherhost{media_root}/my%20cat.png", policy, "names the host 'otherhost'")
    _refused("bad\0name.png", policy, "not a valid path")
    size = (media_root / "my cat.png").stat().st_size
    _refused(
        "my cat.png", MediaPolicy(allowed_local_path=media_root, max_image_bytes=size - 1), f"{size} bytes"
    )


# --- policy -------------------------------------------------------------------------------------------------------


def test_allowed_domains_matching():
    policy = MediaPolicy(allowed_domains=("*.Example.COM.", "[::1]", "10.0.0.1", "Bücher.de"))
    assert policy.allowed_domains == ("*.example.com", "::1", "10.0.0.1", "xn--bcher-kva.de")
    assert policy.allows_host("img.example.com") and policy.allows_host("a.b.example.com")
    assert not policy.allows_host("example.com") and not policy.allows_host("badexample.com")
    assert (
        policy.allows_host("0:0::1") and policy.allows_host("10.0.0.1") and not policy.allows_host("10.0.0.2")
    )
    assert policy.allows_host("xn--bcher-kva.de")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"allowed_domains": ("http://example.com",)},
        {"allowed_domains": ("example.com:8080",)},
        {"allowed_domains": ("",)},
        {"max_image_bytes": 0},
        {"max_image_pixels": -1},
        {"fetch_timeout_s": 0},
        {"max_redirects": -1},
        {"allowed_formats": ("PNG", "NOTAFORMAT")},
        {"allowed_local_path": Path("/nonexistent/llavakit-media")},
    ],
)
def test_invalid_policies_raise_config_errors(kwargs):
    with pytest.raises(ConfigError):
        MediaPolicy(**kwargs)


def test_allowed_local_path_is_resolved(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert (
        MediaPolicy(allowed_local_path=tmp_path / "link").allowed_local_path == (tmp_path / "real").resolve()
    )
