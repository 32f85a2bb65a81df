"""Turn the ``image_url`` of an OpenAI chat content part into a PIL image, without trusting the client.

    >>> policy = MediaPolicy(allowed_domains=("images.internal",), allowed_local_path=Path("/srv/images"))
    >>> image = load_image_url("https://example.com/cat.png", policy)   # RGB, fully decoded

The server accepts ``{"type": "image_url", "image_url": {"url": ...}}`` from whoever can reach it, so the URL, the
bytes behind it and the pixels those bytes claim are all hostile until checked. Supported: ``data:image/...;base64``
URLs, ``http(s)://`` URLs, and (only with ``--allowed-local-media-path``) ``file://`` URLs and plain paths. Threats,
and the check that answers each:

- Server-side request forgery (SSRF): a URL naming ``169.254.169.254`` (cloud metadata), ``localhost:6379`` or
  ``10.x`` makes the server fetch from places only it can reach. Every hop's host is resolved with
  `socket.getaddrinfo` and refused if ANY address is private, loopback, link-local, multicast, reserved,
  unspecified or otherwise not global (also through IPv4-mapped, 6to4 and NAT64 IPv6 forms, and numeric spellings
  like ``2130706433`` since the check reads the resolver's answer, not the URL text), unless the host is in
  ``--allowed-media-domains``. The connection then goes to the checked address itself (host pinned; ``Host``
  header and TLS SNI/certificate check keep the name), so a DNS answer that changes between check and connect
  (DNS rebinding) cannot reach a private address. Redirects are followed by hand, each target re-checked, because
  httpx's ``follow_redirects`` would fetch an internal ``Location`` unchecked. Proxies from the environment are
  ignored (``trust_env=False``): through a proxy the checked address would not be the one contacted.
- Resource exhaustion: one deadline (``fetch_timeout_s``) covers resolution, every hop and the body, so a slow or
  dripping server cannot hold a worker; bodies stream and stop at ``max_image_bytes`` (a larger
  ``Content-Length`` is refused before reading); compressed transfer encodings are refused, since a gzip body
  is a bomb of its own; data URLs and local files are size-checked before they are decoded or read.
- Decompression bombs: a few KB of PNG can declare 30000x30000 pixels (2.7 GB as RGB). The image is opened lazily,
  width*height from the header is checked against ``max_image_pixels``, and only then decoded; PIL's own
  ``DecompressionBombError`` (and its warning, when warnings are errors) becomes the same refusal. PIL's global
  ``Image.MAX_IMAGE_PIXELS`` and the warnings filters are left alone: changing them is not thread-safe.
- Decoder attack surface: only the formats OpenAI accepts plus BMP are decoded (``allowed_formats``), so hostile
  bytes never reach rarely used decoders (EPS runs Ghostscript).
- Path traversal: local reads are off unless ``allowed_local_path`` is set; then the path's real location (``..``
  and symlinks resolved) must lie inside it, and it must be a regular file (no FIFOs or devices).

Videos (vLLM's ``video_url`` part, `load_video_url`) are read under the same policy: the same schemes, local
folder, hosts and fetch deadline (``data:video/...;base64`` URLs), with their own byte limit (``max_video_bytes``).
PyAV reads files, so the bytes go to a private temporary copy, deleted once the frames are decoded or the video is
refused. FFmpeg has far more demuxers and decoders than PIL, and a small file can cost unbounded work, so:

- Demuxers: the container is recognised from its first bytes (MP4/MOV: ``ftyp`` at offset 4; Matroska/WebM:
  ``1A 45 DF A3``; AVI: ``RIFF....AVI ``) before FFmpeg sees the file; anything else, or a container outside
  ``allowed_video_formats``, is refused unopened. FFmpeg then opens the file with that demuxer forced (never
  probing with the others) and only the ``file`` protocol allowed (a reference inside the file cannot reach the
  network or a pipe; MOV's external data references to local files are off by FFmpeg's default).
- Decoders: the video stream's codec must be in ``allowed_video_codecs`` (H.264, HEVC, VP8, VP9, AV1, MPEG-4
  Part 2, MJPEG) before a frame is decoded. Not guaranteed: opening a file runs FFmpeg's ``find_stream_info``,
  which may decode a few packets of each stream (audio included) with the decoder the allowed demuxer names,
  whatever it is, before the codec check can refuse it (bounded by FFmpeg's probe size, 5 MB by default, and its
  frames by the ``max_pixels`` backstop below).
- Work and memory: decoding walks every frame up to the last sampled one (the last frame, when frames are spread
  evenly), so the cost grows with the video's length, not the sampled count: a black 1080p H.264 frame is ~55
  bytes, 40 MiB hold ~750k of them. Before any frame is decoded (from the header and the packets, counted with an
  early stop), a video is refused above ``max_video_source_frames`` frames, ``max_video_decoded_pixels`` (frames x
  width x height, the decoding work), ``max_video_frames`` sampled frames, ``max_image_pixels`` per frame and
  ``max_video_sampled_pixels`` over the sampled frames kept in memory. Decoding then runs under a deadline
  (``video_decode_timeout_s``, checked after every decoded frame), each decoded frame is checked again (a stream
  can change resolution mid-stream; FFmpeg's ``max_pixels``, at 4x the limit since it counts padded widths, stops a
  far larger one before it is allocated, which FFmpeg reports as invalid data), and the kept frames' pixels are
  summed as they are kept.

Frames are sampled with the model's `VideoSpec` by `llavakit.anyres.video.load_video`, given a `DecodeGuard` that
carries these limits.

Every refusal is a `MediaError` (an OpenAI ``invalid_request_error``, HTTP 400: the client sent something this
server will not use, including a URL that timed out or whose server failed) naming the URL and the fix. Messages do
not reveal the server's folders. Nothing here changes global state; `load_image_url` is safe to call from many
threads at once (each call has its own httpx client).
"""

from __future__ import annotations

import base64
import functools
import io
import ipaddress
import os
import socket
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from llavakit.anyres.pixels import check_complete, load_image
from llavakit.anyres.video import DecodeGuard, Video, VideoProbe, import_av, load_video, probe_video
from llavakit.anyres.video_spec import VideoSpec
from llavakit.errors import ConfigError, ImageError, LlavakitError, VideoError

if TYPE_CHECKING:
    import av

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
# 40 megapixels: above any camera photo a client would send (a 24 MP DSLR shot is 6000x4000), far below bombs.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# The formats OpenAI's vision API accepts, plus BMP; every other PIL decoder stays unreachable.
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
DEFAULT_MAX_VIDEO_BYTES = 40 * 1024 * 1024
DEFAULT_MAX_VIDEO_FRAMES = 64  # LLaVA-Video samples 64 frames, OneVision 32
DEFAULT_MAX_VIDEO_SOURCE_FRAMES = 18_000  # 10 minutes at 30 fps
DEFAULT_MAX_VIDEO_DECODED_PIXELS = 18_000 * 1280 * 720  # 10 minutes of 720p at 30 fps (~4.4 min of 1080p)
DEFAULT_MAX_VIDEO_SAMPLED_PIXELS = 64 * 1920 * 1080  # 64 sampled 1080p frames, ~400 MB as RGB
DEFAULT_VIDEO_DECODE_TIMEOUT_S = 30.0
# FFmpeg demuxer names (``container.format.name``): MP4/MOV, Matroska/WebM, AVI; the containers `_sniff_container`
# recognises.
DEFAULT_VIDEO_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi")
# FFmpeg codec names (``Codec.canonical_name``, not the decoder's name: AV1 may decode with libdav1d).
DEFAULT_VIDEO_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg")
# Packets demuxed between two deadline checks while counting them.
_VIDEO_CHECK_INTERVAL = 256
# FFmpeg's max_pixels counts the width padded to its stride alignment (up to 64: a 32x32 frame counts 64x32), so at
# max_image_pixels itself it would refuse frames the policy allows; this multiple of it is a backstop (a frame above
# it is never allocated), _FrameGuard the exact check.
_FFMPEG_PIXEL_SLACK = 4

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
_MAX_LABEL_CHARS = 200
_DATA_URL_LABEL_CHARS = 40

_LOCAL_FIX = "send the image as a data:image/...;base64 URL or an http(s) URL"
_VIDEO_FIX = "send the video as a data:video/...;base64 URL or an http(s) URL"
_DOMAINS_FIX = "the server operator can allow this host with --allowed-media-domains"


class MediaError(LlavakitError, ValueError):
    """An ``image_url`` the server refuses; ``status`` is the HTTP status to answer (always a 4xx).

    ``code`` is the OpenAI error ``code``: ``"invalid_image_url"`` (malformed, not allowed, unreachable, timed
    out), ``"image_too_large"`` (bytes or pixels above the limits) or ``"invalid_image_format"`` (not a decodable
    image of an allowed format).
    """

    def __init__(self, message: str, *, code: str = "invalid_image_url", status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class MediaPolicy:
    """What `load_image_url` may read, and how much.

    Args:
        allowed_local_path: the folder ``file://`` URLs and plain paths may read from (symlinks resolved; relative
            paths are taken relative to it); None: no local reads at all.
        allowed_domains: hosts fetched even when they resolve to private/loopback addresses: exact hostnames or IP
            literals, or ``*.example.com`` for any subdomain of example.com (not example.com itself).
        max_image_bytes: largest encoded image (download, decoded data URL, local file).
        max_image_pixels: largest width*height, checked from the header before decoding.
        fetch_timeout_s: deadline for a whole http(s) fetch: resolution, every redirect hop and the body.
        max_redirects: redirects followed before giving up.
        allowed_formats: PIL format names that may be decoded.
        max_video_bytes: largest encoded video (download, decoded data URL, local file).
        max_video_frames: most frames one video may be sampled to (counted from its packets before decoding): a
            small file can hold a great many tiny frames, each of which becomes a full tile.
        max_video_source_frames: most frames (video packets) a video may have, counted before decoding: decoding
            walks all of them.
        max_video_decoded_pixels: largest frames x width x height of a video (header size), before decoding.
        max_video_sampled_pixels: largest sum of the distinct sampled frames' width x height (the frames kept in
            memory), checked from the header before decoding and on the decoded frames.
        video_decode_timeout_s: deadline for reading a video once its bytes are here (header, packets, decoding).
        allowed_video_formats: FFmpeg demuxer names (``container.format.name``) whose videos may be decoded; a
            subset of `DEFAULT_VIDEO_FORMATS`, the containers recognised from their first bytes.
        allowed_video_codecs: FFmpeg codec names (``canonical_name``) of video streams that may be decoded.
    """

    allowed_local_path: Path | None = None
    allowed_domains: tuple[str, ...] = ()
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    fetch_timeout_s: float = 10.0
    max_redirects: int = 3
    allowed_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES
    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES
    max_video_source_frames: int = DEFAULT_MAX_VIDEO_SOURCE_FRAMES
    max_video_decoded_pixels: int = DEFAULT_MAX_VIDEO_DECODED_PIXELS
    max_video_sampled_pixels: int = DEFAULT_MAX_VIDEO_SAMPLED_PIXELS
    video_decode_timeout_s: float = DEFAULT_VIDEO_DECODE_TIMEOUT_S
    allowed_video_formats: tuple[str, ...] = DEFAULT_VIDEO_FORMATS
    allowed_video_codecs: tuple[str, ...] = DEFAULT_VIDEO_CODECS

    def __post_init__(self) -> None:
        for name in (
            "max_image_bytes",
            "max_image_pixels",
            "fetch_timeout_s",
            "max_video_bytes",
            "max_video_frames",
            "max_video_source_frames",
            "max_video_decoded_pixels",
            "max_video_sampled_pixels",
            "video_decode_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"MediaPolicy.{name}={getattr(self, name)!r} must be positive")
        unknown_containers = set(self.allowed_video_formats) - set(DEFAULT_VIDEO_FORMATS)
        if unknown_containers:
            raise ConfigError(
                f"MediaPolicy.allowed_video_formats has {sorted(unknown_containers)}; only {DEFAULT_VIDEO_FORMATS} "
                "are recognised from their first bytes"
            )
        if self.max_redirects < 0:
            raise ConfigError(f"MediaPolicy.max_redirects={self.max_redirects!r} must be >= 0")
        unknown = set(self.allowed_formats) - set(Image.registered_extensions().values())
        if unknown:
            raise ConfigError(f"MediaPolicy.allowed_formats has {sorted(unknown)}, not PIL format names")
        # Frozen: the normalised values replace the given ones once, here.
        object.__setattr__(self, "allowed_domains", tuple(_allowed_domain(h) for h in self.allowed_domains))
        if self.allowed_local_path is not None:
            root = Path(self.allowed_local_path).expanduser().resolve()
            if not root.is_dir():
                raise ConfigError(
                    f"--allowed-local-media-path {self.allowed_local_path} is not an existing folder; "
                    "create it or pass the folder that holds the images"
                )
            object.__setattr__(self, "allowed_local_path", root)

    def allows_host(self, host: str) -> bool:
        """Whether ``host`` (a hostname or IP literal) is in `allowed_domains`, exactly or by a ``*.`` wildcard."""
        host = _normalise_host(host)
        return any(
            host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:]))
            for allowed in self.allowed_domains
        )


def _allowed_domain(entry: str) -> str:
    """An ``allowed_domains`` entry in the form request hosts are compared in (IDNA-encoded, see `_normalise_host`)."""
    wildcard, name = ("*.", entry.strip()[2:]) if entry.strip().startswith("*.") else ("", entry)
    host = _normalise_host(name)
    try:
        ipaddress.ip_address(host)
        return wildcard + host
    except ValueError:
        pass
    if not host or any(char in host for char in ":/@?#*"):
        raise ConfigError(
            f"--allowed-media-domains entry {entry!r} must be a hostname, an IP address or *.domain (no scheme, "
            "port or path)"
        )
    try:
        return wildcard + host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ConfigError(f"--allowed-media-domains entry {entry!r} is not a valid hostname ({exc})") from exc


def _normalise_host(host: str) -> str:
    """Lower case, without IPv6 brackets or a trailing dot; IP literals in canonical form (``::1``, not ``0::1``)."""
    host = host.strip().strip("[]").rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def load_image_url(url: str, policy: MediaPolicy) -> Image.Image:
    """The image an OpenAI ``image_url.url`` names, as a fully decoded RGB PIL image.

    Args:
        url: a ``data:image/<type>;base64,...`` URL, an ``http(s)://`` URL, or (with ``policy.allowed_local_path``)
            a ``file://`` URL or a plain path.
        policy: what may be read and the size limits.

    Raises:
        MediaError: (status 400) the URL is malformed, not allowed, unreachable, too large, or not an image.
    """
    if not isinstance(url, str) or not url.strip():
        raise MediaError(f"image_url.url must be a non-empty string, got {url!r}; {_LOCAL_FIX}")
    label = _describe(url)
    data = _read_bytes(url.strip(), label, policy)
    return _decode(data, label, policy)


def _describe(url: str) -> str:
    """How messages name the URL: data URLs shortened (they can be megabytes), others capped."""
    if url[:5].lower() == "data:":
        return f"image_url {url[:_DATA_URL_LABEL_CHARS]!r}... ({len(url)} chars)"
    if len(url) > _MAX_LABEL_CHARS:
        return f"image_url {url[:_MAX_LABEL_CHARS]!r}... ({len(url)} chars)"
    return f"image_url {url!r}"


def _read_bytes(url: str, label: str, policy: MediaPolicy, kind: str = "image") -> bytes:
    """The encoded image (``kind`` video: video) bytes, dispatched on the URL scheme."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:  # e.g. an unclosed "[" IPv6 bracket
        raise MediaError(f"{label} is not a valid URL ({exc}); {_LOCAL_FIX}") from exc
    if scheme == "data":
        return _read_data_url(url, label, policy, kind)
    if scheme in ("http", "https"):
        return _fetch(url, label, policy, kind)
    if scheme in ("file", ""):
        return _read_local(url, scheme, label, policy)
    local = " (or a file:// URL under the server's allowed folder)" if policy.allowed_local_path else ""
    raise MediaError(f"{label} has the unsupported scheme {scheme!r}; {_LOCAL_FIX}{local}")


def _too_large(label: str, size: str, limit: int) -> MediaError:
    return MediaError(
        f"{label} is {size}, above this server's limit of {limit} bytes; send a smaller or more compressed file",
        code="image_too_large",
    )


# --- data: URLs -------------------------------------------------------------------------------------------------


def _read_data_url(url: str, label: str, policy: MediaPolicy, kind: str = "image") -> bytes:
    """Decode ``data:<kind>/<type>[;param]*;base64,<payload>`` strictly (standard alphabet, padding, no spaces)."""
    header, comma, payload = url[len("data:") :].partition(",")
    mime, *params = header.split(";")
    if not comma or [p.strip().lower() for p in params[-1:]] != ["base64"]:
        raise MediaError(f"{label} is not a base64 data URL; send data:{kind}/<type>;base64,<base64 data>")
    if not mime.strip().lower().startswith(f"{kind}/"):
        example = "image/png" if kind == "image" else "video/mp4"
        raise MediaError(
            f"{label} has the media type {mime!r}; data URLs must be {kind}/* (data:{example};base64,...)",
            code="invalid_image_format",
        )
    # 4 base64 characters carry 3 bytes: refuse oversized payloads before decoding them.
    if len(payload) // 4 * 3 > policy.max_image_bytes:
        raise _too_large(label, f"about {len(payload) // 4 * 3} bytes", policy.max_image_bytes)
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError as exc:  # binascii.Error (bad character or padding) or a non-ASCII character
        raise MediaError(
            f"{label} is not valid base64 ({exc}); encode the file with standard base64 "
            "(A-Z a-z 0-9 + /, '=' padding, no spaces or line breaks)"
        ) from exc


# --- local files --------------------------------------------------------------------------------------------------


def _read_local(url: str, scheme: str, label: str, policy: MediaPolicy) -> bytes:
    """Read a ``file://`` URL or plain path whose real location lies inside ``policy.allowed_local_path``."""
    root = policy.allowed_local_path
    if root is None:
        raise MediaError(
            f"{label}: this server does not read local files; {_LOCAL_FIX} (the server operator can allow a "
            "folder with --allowed-local-media-path)"
        )
    path = _local_path(url, label) if scheme == "file" else url
    try:
        # realpath resolves "..", and symlinks anywhere on the path, to where a read would really go.
        real = Path(os.path.realpath(root / path))
    except ValueError as exc:  # an embedded NUL byte
        raise MediaError(f"{label} is not a valid path ({exc}); {_LOCAL_FIX}") from exc
    outside = f"{label} is outside the folder this server may read (--allowed-local-media-path)"
    if not real.is_relative_to(root):
        raise MediaError(f"{outside}; use a path inside it, or {_LOCAL_FIX}")
    try:
        info = real.stat()
    except OSError as exc:
        raise MediaError(
            f"{label} does not exist or cannot be read ({exc.strerror}); check the path"
        ) from exc
    if not stat.S_ISREG(info.st_mode):
        raise MediaError(f"{label} is not a regular file; pass an image file's path")
    if info.st_size > policy.max_image_bytes:
        raise _too_large(label, f"{info.st_size} bytes", policy.max_image_bytes)
    with real.open("rb") as handle:
        data = handle.read(policy.max_image_bytes + 1)  # the file may have grown since stat
    if len(data) > policy.max_image_bytes:
        raise _too_large(label, f"over {policy.max_image_bytes} bytes", policy.max_image_bytes)
    return data


def _local_path(url: str, label: str) -> str:
    """The path of a ``file:`` URL (percent-decoded); only this machine (no host, or ``localhost``)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"{label} names the host {parts.netloc!r}; file URLs must be file:///<path>")
    return unquote(parts.path)


# --- http(s) --------------------------------------------------------------------------------------------------


def _fetch(url: str, label: str, policy: MediaPolicy, kind: str = "image") -> bytes:
    """Download an http(s) URL under one deadline, following at most ``max_redirects`` checked redirects."""
    deadline = time.monotonic() + policy.fetch_timeout_s
    target = _http_url(url, label)
    headers = {"Accept": f"{kind}/*", "Accept-Encoding": "identity", "User-Agent": "llavakit"}
    try:
        with httpx.Client(
            trust_env=False, follow_redirects=False, headers=headers, verify=_ssl_context()
        ) as client:
            for _ in range(policy.max_redirects + 1):
                with _send(client, target, label, policy, deadline) as response:
                    if response.status_code in _REDIRECT_STATUSES:
                        target = _redirect_target(response, target, label)
                        continue
                    _check_response(response, label, policy)
                    return _read_body(response, label, policy, deadline)
    except httpx.TimeoutException as exc:
        raise _timed_out(label, policy) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise MediaError(
            f"{label} could not be fetched ({type(exc).__name__}: {exc}); check that the URL is reachable "
            f"from the server, or {_LOCAL_FIX}"
        ) from exc
    raise MediaError(
        f"{label} redirected more than {policy.max_redirects} times; send the final image URL instead"
    )


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One certificate-verifying TLS context for every fetch: building one reads the CA bundle (tens of ms)."""
    return httpx.create_ssl_context()


def _http_url(url: str | httpx.URL, label: str) -> httpx.URL:
    """Parse with httpx, the same parser that builds the request, so the host checked is the host contacted."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise MediaError(f"{label} is not a valid URL ({exc}); {_LOCAL_FIX}") from exc
    if parsed.scheme not in ("http", "https"):
        raise MediaError(f"{label} leads to the scheme {parsed.scheme!r}; only http and https are fetched")
    if not parsed.raw_host:
        raise MediaError(f"{label} has no host; send a full http(s)://host/path URL")
    return parsed


@contextmanager
def _send(
    client: httpx.Client, target: httpx.URL, label: str, policy: MediaPolicy, deadline: float
) -> Iterator[httpx.Response]:
    """Send one GET to a checked address of ``target``'s host; the response is streamed and closed on exit."""
    host = target.raw_host.decode("ascii")
    port = target.port or (443 if target.scheme == "https" else 80)
    request = client.build_request("GET", target, timeout=_remaining(deadline, label, policy))
    if target.scheme == "https":
        request.extensions["sni_hostname"] = host  # certificate checked against the name, not the pinned IP
    addresses = _checked_addresses(host, port, label, policy, deadline)
    for index, address in enumerate(addresses):
        # Pin the connection to the checked address; the Host header built above keeps the name.
        request.url = target.copy_with(host=address)
        try:
            response = client.send(request, stream=True)
        except httpx.ConnectError:
            if index == len(addresses) - 1:
                raise
            continue  # the next address of the host (e.g. IPv4 after an unreachable IPv6)
        try:
            yield response
        finally:
            response.close()
        return


def _checked_addresses(host: str, port: int, label: str, policy: MediaPolicy, deadline: float) -> list[str]:
    """The host's addresses, refused if any is not public (unless the host is allowed)."""
    addresses = _resolve(host, port, label, policy, deadline)
    if not policy.allows_host(host):
        for address in addresses:
            if not _is_public(ipaddress.ip_address(address)):
                raise MediaError(
                    f"{label}: the host {host!r} has the non-public address {address} (private, loopback, "
                    f"link-local or reserved), which this server does not fetch from; {_DOMAINS_FIX}, or "
                    f"{_LOCAL_FIX} with a public host"
                )
    return addresses


def _resolve(host: str, port: int, label: str, policy: MediaPolicy, deadline: float) -> list[str]:
    """Resolve ``host`` within the deadline (getaddrinfo itself has no timeout, so it runs in its own thread)."""
    try:
        return [str(ipaddress.ip_address(host))]  # an IP literal: nothing to look up
    except ValueError:
        pass
    answer: list[list[str] | Exception] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            answer.append(list(dict.fromkeys(str(info[4][0]) for info in infos)))
        except (OSError, UnicodeError) as exc:
            answer.append(exc)

    thread = threading.Thread(target=lookup, name="llavakit-media-resolve", daemon=True)
    thread.start()
    thread.join(_remaining(deadline, label, policy))
    if not answer:
        raise _timed_out(label, policy)
    if isinstance(answer[0], Exception) or not answer[0]:
        raise MediaError(f"{label}: the host {host!r} cannot be resolved ({answer[0]}); check the URL")
    return answer[0]


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address is globally routable, judging IPv4 embedded in IPv6 (mapped, 6to4, NAT64) as IPv4."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not _is_public(embedded):
            return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def _redirect_target(response: httpx.Response, current: httpx.URL, label: str) -> httpx.URL:
    """Where a redirect points (relative ``Location`` resolved against the current URL), parsed and checked."""
    location = response.headers.get("location")
    if not location:
        raise MediaError(
            f"{label} answered HTTP {response.status_code} without a Location; send the final URL"
        )
    try:
        return _http_url(current.join(location), f"{label} (redirected to {location[:_MAX_LABEL_CHARS]!r})")
    except httpx.InvalidURL as exc:
        raise MediaError(f"{label} redirected to an invalid URL ({exc}); send the final image URL") from exc


def _check_response(response: httpx.Response, label: str, policy: MediaPolicy) -> None:
    """Refuse failures, compressed bodies and oversized declared lengths before reading the body."""
    if response.status_code != 200:
        raise MediaError(
            f"{label} answered HTTP {response.status_code} {response.reason_phrase}; check that the URL serves "
            "the image publicly"
        )
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise MediaError(
            f"{label} sent a {encoding!r}-compressed body; this server only downloads uncompressed image files"
        )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_image_bytes:
        raise _too_large(label, f"{declared} bytes (Content-Length)", policy.max_image_bytes)


def _read_body(response: httpx.Response, label: str, policy: MediaPolicy, deadline: float) -> bytes:
    """Read the body chunk by chunk, stopping as soon as it passes ``max_image_bytes`` or the deadline."""
    chunks: list[bytes] = []
    received = 0
    for chunk in response.iter_raw():
        received += len(chunk)
        if received > policy.max_image_bytes:
            raise _too_large(label, f"over {policy.max_image_bytes} bytes", policy.max_image_bytes)
        chunks.append(chunk)
        _remaining(deadline, label, policy)
    return b"".join(chunks)


def _remaining(deadline: float, label: str, policy: MediaPolicy) -> float:
    """Seconds left before ``deadline``, or the timeout error when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise _timed_out(label, policy)
    return left


def _timed_out(label: str, policy: MediaPolicy) -> MediaError:
    return MediaError(
        f"{label} timed out: the download did not finish within {policy.fetch_timeout_s:g} s; use a faster host "
        f"or {_LOCAL_FIX}"
    )


# --- decoding -----------------------------------------------------------------------------------------------------


def _decode(data: bytes, label: str, policy: MediaPolicy) -> Image.Image:
    """Open lazily, check the header's pixel count, then decode to RGB with `load_image`."""
    formats = "/".join(policy.allowed_formats)
    try:
        image = Image.open(io.BytesIO(data), formats=policy.allowed_formats)
    except UnidentifiedImageError as exc:
        raise MediaError(
            f"{label} is not a {formats} image ({len(data)} bytes); send one of those formats",
            code="invalid_image_format",
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(label, str(exc), policy) from exc
    except Exception as exc:  # PIL's header parsers raise assorted types (struct.error, ...) on hostile bytes
        raise _corrupt(label, exc) from exc
    width, height = image.size
    if width * height > policy.max_image_pixels:
        raise _too_many_pixels(label, f"{width}x{height} (WxH) = {width * height} pixels", policy)
    try:
        check_complete(data, image.format, label)
    except ImageError as exc:
        raise _corrupt(label, exc) from exc
    try:
        return load_image(image, max_pixels=policy.max_image_pixels)
    except ImageError as exc:  # too small, or truncated/corrupt pixel data
        raise MediaError(f"{label} cannot be used: {exc}", code="invalid_image_format") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # e.g. a GIF frame's size
        raise _too_many_pixels(label, str(exc), policy) from exc
    except Exception as exc:  # as above: decoders' own exception types
        raise _corrupt(label, exc) from exc


def _too_many_pixels(label: str, size: str, policy: MediaPolicy) -> MediaError:
    return MediaError(
        f"{label} is {size}, above this server's limit of {policy.max_image_pixels} pixels (a decompression "
        "bomb, or a very large image); downscale it before sending",
        code="image_too_large",
    )


def _corrupt(label: str, exc: Exception) -> MediaError:
    return MediaError(
        f"{label} is a corrupt or truncated image ({type(exc).__name__}: {exc}); re-encode it as PNG or JPEG",
        code="invalid_image_format",
    )


# --- videos -------------------------------------------------------------------------------------------------------


def load_video_url(url: str, policy: MediaPolicy, spec: VideoSpec) -> Video:
    """The video a ``video_url.url`` names, its frames sampled with ``spec`` (see the module docstring).

    Args:
        url: a ``data:video/<type>;base64,...`` URL, an ``http(s)://`` URL, or (with ``policy.allowed_local_path``)
            a ``file://`` URL or a plain path.
        policy: what may be read and the limits (``max_video_bytes``, the ``max_video_*`` bounds, the video
            containers and codecs, ``max_image_pixels`` per frame, ``video_decode_timeout_s``).
        spec: the model's frame sampling.

    Raises:
        MediaError: (status 400) the URL is malformed, not allowed, unreachable, too large, or not a usable video
            (codes ``invalid_video_url``, ``video_too_large``, ``invalid_video_format``).
    """
    if not isinstance(url, str) or not url.strip():
        raise MediaError(
            f"video_url.url must be a non-empty string, got {url!r}; {_VIDEO_FIX}", code="invalid_video_url"
        )
    label = "video_url" + _describe(url).removeprefix("image_url")
    try:
        data = _read_bytes(url.strip(), label, replace(policy, max_image_bytes=policy.max_video_bytes), "video")
    except MediaError as err:  # the image reader's words, said of a video
        raise MediaError(
            str(err).replace(_LOCAL_FIX, _VIDEO_FIX), code=err.code.replace("image", "video"), status=err.status
        ) from None
    import_av()  # without PyAV the server's installation, not the request, is at fault: a VideoError, a 500
    container = _sniff_container(data, label, policy)
    deadline = time.monotonic() + policy.video_decode_timeout_s
    with tempfile.TemporaryDirectory(prefix="llavakit-video-") as folder:
        path = Path(folder) / "video"
        path.write_bytes(data)
        try:
            return _read_video(path, container, label, policy, spec, deadline)
        except VideoError as err:  # names the temporary copy (FFmpeg's text too): say the URL instead
            message = str(err).replace(f"video {str(path)!r}", label).replace(str(path), "the video")
            raise MediaError(message, code="invalid_video_format") from None


def _read_video(
    path: Path, container: str, label: str, policy: MediaPolicy, spec: VideoSpec, deadline: float
) -> Video:
    """Check the header and the packets, then the sampled frames' budget, then decode under `_FrameGuard`."""
    backstop = _FFMPEG_PIXEL_SLACK * policy.max_image_pixels
    guard = DecodeGuard(
        demuxer=container.split(",")[0],  # "mov", "matroska", "avi": FFmpeg's short names for the demuxers
        options={"protocol_whitelist": "file", "max_pixels": str(backstop)},
        max_frame_pixels=backstop,
    )
    width, height = _check_video_header(path, label, policy, guard, deadline)
    probe = probe_video(path, spec, guard)
    _check_budget(probe, width * height, label, policy)
    _check_deadline(deadline, label, policy)
    on_frame = _FrameGuard(set(probe.frame_indices), label, policy, deadline)
    return load_video(path, spec, replace(guard, on_frame=on_frame), probe=probe)


def _sniff_container(data: bytes, label: str, policy: MediaPolicy) -> str:
    """The FFmpeg demuxer name of the container the first bytes show, refused unless in ``allowed_video_formats``
    (FFmpeg never sees the bytes of any other container)."""
    if data[4:8] == b"ftyp":
        container = "mov,mp4,m4a,3gp,3g2,mj2"
    elif data[:4] == b"\x1a\x45\xdf\xa3":
        container = "matroska,webm"
    elif data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        container = "avi"
    else:
        container = None
    if container not in policy.allowed_video_formats:
        found = f"a {container!r} file" if container else f"not an MP4/MOV, WebM/MKV or AVI file (starts {data[:12]!r})"
        raise MediaError(
            f"{label} is {found}, not one of this server's video containers {list(policy.allowed_video_formats)}; "
            "re-encode it (e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`)",
            code="invalid_video_format",
        )
    return container


def _check_video_header(
    path: Path, label: str, policy: MediaPolicy, guard: DecodeGuard, deadline: float
) -> tuple[int, int]:
    """Open with the sniffed demuxer forced, refuse a codec outside ``allowed_video_codecs``, frames above
    ``max_image_pixels`` and more than ``max_video_source_frames`` packets (counting stops at the first one over),
    all before decoding; ``(width, height)`` from the header."""
    av = import_av()
    try:
        with av.open(str(path), mode="r", format=guard.demuxer, options=dict(guard.options)) as container:
            if not container.streams.video:
                raise MediaError(f"{label} has no video stream; send a video file", code="invalid_video_format")
            stream = container.streams.video[0]
            context = stream.codec_context  # None: FFmpeg has no decoder for the codec
            _check_codec(context.codec.canonical_name if context is not None else "none", label, policy)
            width, height = context.width, context.height
            if width * height > policy.max_image_pixels:
                raise _video_too_large(
                    label,
                    f"has {width}x{height} (WxH) frames",
                    f"{policy.max_image_pixels} pixels per frame",
                    "downscale it",
                )
            _check_packet_count(container, stream, label, policy, deadline)
    except av.FFmpegError as exc:  # its text names the temporary copy; the reason alone is kept
        raise MediaError(
            f"{label} is not a video FFmpeg can open as {guard.demuxer} ({exc.strerror}); send an MP4, WebM, MKV "
            "or AVI file",
            code="invalid_video_format",
        ) from None
    return width, height


def _check_codec(codec: str, label: str, policy: MediaPolicy) -> None:
    if codec not in policy.allowed_video_codecs:
        raise MediaError(
            f"{label} is encoded with {codec!r}, not one of this server's video codecs "
            f"{list(policy.allowed_video_codecs)}; re-encode it (e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`)",
            code="invalid_video_format",
        )


def _check_packet_count(
    container: av.container.InputContainer, stream: av.VideoStream, label: str, policy: MediaPolicy, deadline: float
) -> None:
    """Refuse more than ``max_video_source_frames`` video packets, stopping at the first one over the limit."""
    packets = 0
    for packet in container.demux(stream):
        packets += packet.size > 0  # PyAV's final flush packet is empty
        if packets > policy.max_video_source_frames:
            raise _video_too_large(
                label,
                f"has more than {policy.max_video_source_frames} frames",
                f"{policy.max_video_source_frames} frames per video (decoding reads them all)",
                "send a shorter clip or a lower frame rate",
            )
        if packets % _VIDEO_CHECK_INTERVAL == 0:
            _check_deadline(deadline, label, policy)


def _check_budget(probe: VideoProbe, frame_pixels: int, label: str, policy: MediaPolicy) -> None:
    """Refuse, before decoding, a video sampled to more than ``max_video_frames`` frames (a model whose video spec
    sets no ``frames_upbound`` samples every ``video_fps``-th second of any length), or whose decoding work or kept
    frames (header size) exceed ``max_video_decoded_pixels`` / ``max_video_sampled_pixels``."""
    frames = probe.num_frames
    if frames > policy.max_video_frames:
        raise _video_too_large(
            label, f"would be sampled to {frames} frames", f"{policy.max_video_frames}", "send a shorter clip"
        )
    decoded = probe.total_frames * frame_pixels
    if decoded > policy.max_video_decoded_pixels:
        raise _video_too_large(
            label,
            f"has {probe.total_frames} frames of {frame_pixels} pixels ({decoded} pixels to decode)",
            f"{policy.max_video_decoded_pixels} decoded pixels per video",
            "send a shorter or lower-resolution clip",
        )
    kept = len(set(probe.frame_indices)) * frame_pixels
    if kept > policy.max_video_sampled_pixels:
        raise _video_too_large(
            label,
            f"would keep {len(set(probe.frame_indices))} sampled frames of {frame_pixels} pixels ({kept} pixels)",
            f"{policy.max_video_sampled_pixels} pixels over the sampled frames",
            "downscale it",
        )


class _FrameGuard:
    """`DecodeGuard.on_frame` for one video: the deadline, ``max_image_pixels`` per decoded frame (the resolution
    can change mid-stream) and ``max_video_sampled_pixels`` summed over the sampled frames as they are kept."""

    def __init__(self, wanted: set[int], label: str, policy: MediaPolicy, deadline: float) -> None:
        self.wanted, self.label, self.policy, self.deadline = wanted, label, policy, deadline
        self.kept_pixels = 0

    def __call__(self, index: int, width: int, height: int) -> None:
        _check_deadline(self.deadline, self.label, self.policy)
        pixels = width * height
        if pixels > self.policy.max_image_pixels:
            raise _video_too_large(
                self.label,
                f"has a {width}x{height} (WxH) frame at frame {index}",
                f"{self.policy.max_image_pixels} pixels per frame",
                "downscale it",
            )
        if index in self.wanted:
            self.kept_pixels += pixels
            if self.kept_pixels > self.policy.max_video_sampled_pixels:
                raise _video_too_large(
                    self.label,
                    f"keeps more than {self.policy.max_video_sampled_pixels} pixels in its sampled frames (frames "
                    f"grow mid-stream, to {width}x{height} at frame {index})",
                    f"{self.policy.max_video_sampled_pixels} pixels over the sampled frames",
                    "downscale it",
                )


def _check_deadline(deadline: float, label: str, policy: MediaPolicy) -> None:
    if time.monotonic() > deadline:
        raise _video_too_large(
            label,
            f"took more than {policy.video_decode_timeout_s:g} s to read",
            f"{policy.video_decode_timeout_s:g} s of decoding per video",
            "send a shorter or lower-resolution clip",
        )


def _video_too_large(label: str, what: str, limit: str, fix: str) -> MediaError:
    return MediaError(f"{label} {what}, above this server's limit of {limit}; {fix}", code="video_too_large")
