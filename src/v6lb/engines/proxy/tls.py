"""TLS termination for proxy VIPs (the builtin engine), with the standard ``ssl`` module.

:func:`load_tls` reads a VIP's ``tls:`` files into a :class:`TlsSetup` (one
``SSLContext`` per certificate; the first is the default, the others are chosen by
SNI in the ``sni_callback``) and refuses a missing, unreadable or mismatched file
with a :class:`~v6lb.model.schema.ConfigError` naming the file and the field;
`v6lb check` and `v6lb run` call :func:`check_tls`. :class:`TlsLayer` is the
protocol of one accepted connection: it runs the handshake on memory BIOs (bounded
by the header timeout, or proxy-l4's connect timeout), then hands the plaintext to
the HTTP (or proxy-l4) protocol, to which it is the transport; when ALPN chose
``h2``, the HTTP/2 protocol (:class:`.h2.H2Client`) takes the HTTP/1.1 one's place.
Failures are counted as the VIP's errors: ``tls_handshake_failed`` (garbage, no
shared version or cipher, a refused SNI or client certificate),
``tls_handshake_timeout`` (no complete handshake in time) and ``tls_unknown_sni``
(refused for its SNI, with ``unknown_sni: refuse``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from v6lb.model.config import Config, TlsCertificate, TlsOptions
from v6lb.model.schema import Where

__all__ = ["TlsLayer", "TlsSetup", "check_tls", "load_tls"]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_READ = 65536


def _read(path: str, where: Where, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(1 << 20)
    except OSError as exc:
        raise where.error(
            f"cannot read the {what} {path}: {exc.strerror or exc}",
            "check the file name (relative names are from the config file's directory)"
            " and that v6lb may read it",
        ) from None


def _context(tls: TlsOptions, cert: TlsCertificate, where: Where, top: Where) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    crt = _read(cert.cert, where.key("cert"), "certificate file")
    key = _read(cert.key, where.key("key"), "key file")
    if b"-----BEGIN CERTIFICATE-----" not in crt:
        raise where.key("cert").error(
            f"{cert.cert} holds no PEM certificate", "give the PEM certificate (chain) file"
        )
    if b"PRIVATE KEY-----" not in key:
        raise where.key("key").error(
            f"{cert.key} holds no PEM private key", "give the PEM private key file"
        )
    try:
        ctx.load_cert_chain(cert.cert, cert.key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise where.key("key").error(
                f"the key {cert.key} does not match the certificate {cert.cert}",
                "give the key the certificate was issued for",
            ) from None
        raise where.key("cert").error(
            f"{cert.cert} and {cert.key} cannot be loaded: {exc.reason or exc}",
            "give a PEM certificate and its unencrypted PEM key",
        ) from None
    except OSError as exc:
        raise where.key("cert").error(
            f"{cert.cert} and {cert.key} cannot be loaded: {exc.strerror or exc}",
            "check the files",
        ) from None
    ctx.set_alpn_protocols(list(tls.alpn))
    if tls.client_ca is not None:
        at = top.key("client_ca")
        _read(tls.client_ca, at, "client CA file")
        try:
            ctx.load_verify_locations(cafile=tls.client_ca)
        except ssl.SSLError as exc:
            raise at.error(
                f"{tls.client_ca} holds no usable CA certificate: {exc.reason or exc}",
                "give the PEM file of the CA that issues the client certificates",
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class TlsSetup:
    """A VIP's contexts: the default one (the first certificate) and one per SNI name.

    ``on_unknown`` is called for a handshake refused for its SNI (``unknown_sni: refuse``).
    """

    def __init__(self, tls: TlsOptions, where: Where) -> None:
        self.tls = tls
        self.on_unknown: Callable[[], None] = lambda: None
        contexts = [
            _context(tls, c, where.key("certificates").index(i), where)
            for i, c in enumerate(tls.certificates)
        ]
        self.default = contexts[0]
        self.by_name: dict[str, ssl.SSLContext] = {}
        for c, ctx in zip(tls.certificates, contexts, strict=True):
            for name in c.names:
                self.by_name[name] = ctx
        self.refuse = tls.unknown_sni == "refuse"
        for ctx in contexts:
            ctx.sni_callback = self._sni

    def pick(self, name: str | None) -> ssl.SSLContext | None:
        """The context for an SNI name (exact, then ``*.`` one label up); None if none."""
        if name is None:
            return None
        name = name.lower().rstrip(".")
        got = self.by_name.get(name)
        if got is None and "." in name:
            got = self.by_name.get("*." + name.split(".", 1)[1])
        return got

    def _sni(self, obj: Any, name: str | None, ctx: ssl.SSLContext) -> int | None:
        got = self.pick(name)
        if got is None:
            if self.refuse:
                self.on_unknown()
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            got = self.default
        if got is not ctx:
            obj.context = got
        return None


def load_tls(tls: TlsOptions, where: Where) -> TlsSetup:
    """Read a VIP's certificate files; a :class:`ConfigError` names the bad one."""
    return TlsSetup(tls, where)


def check_tls(config: Config) -> dict[str, TlsSetup]:
    """Every proxy VIP's ``tls:`` loaded (by VIP name); raises :class:`ConfigError`."""
    out: dict[str, TlsSetup] = {}
    for i, vip in enumerate(config.vips):
        tls = getattr(vip.options, "tls", None)
        if vip.mode.is_proxy and tls is not None:
            out[vip.name] = load_tls(tls, Where(config.source, f"vips[{i}].tls"))
    return out


class TlsLayer(asyncio.Protocol):
    """TLS on one accepted connection, in front of ``app`` (an HTTP protocol).

    ``app`` sees this object as its transport from the TCP accept on (so its admission
    and header timeout cover the handshake); what it writes before the handshake is
    done is dropped. ``count`` counts an error reason on the VIP.
    """

    def __init__(
        self,
        setup: TlsSetup,
        app: asyncio.Protocol,
        timeout: float,
        count: Callable[[str], None],
    ) -> None:
        self.setup = setup
        self.app = app
        self.timeout = timeout
        self.count = count
        self.raw: Any = None
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = setup.default.wrap_bio(self.inc, self.out, server_side=True)
        self.ready = False
        self.closing = False
        self.failed = False
        self.paused = False
        self.eof_sent = False  # our close_notify is out (write_eof)
        self.eof_got = False  # the client's close_notify (or FIN) is in: app was told once
        self.timer: asyncio.TimerHandle | None = None
        # proxy-l7: makes the HTTP/2 protocol from ``app`` when ALPN picked h2 (.h2)
        self.h2: Callable[[asyncio.Protocol], asyncio.Protocol] | None = None

    # --- the TCP side ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.timeout, self._timed_out)
        self.app.connection_made(self)  # type: ignore[arg-type]

    def _timed_out(self) -> None:
        if not self.ready and not self.closing:
            self.failed = True
            self.count("tls_handshake_timeout")
            self.closing = True
            self.raw.abort()

    def data_received(self, data: bytes) -> None:
        if self.closing or self.eof_got:  # nothing may follow a close_notify
            return
        self.inc.write(data)
        if not self.ready:
            self._handshake()
        if self.ready and not self.paused:
            self._read()

    def _handshake(self) -> None:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError):
            self.failed = True
            self.count("tls_handshake_failed")
            self._flush()  # the alert
            self.closing = True
            self.raw.close()
            return
        self.ready = True
        if self.timer is not None:
            self.timer.cancel()
        self._flush()
        if self.h2 is not None and self.obj.selected_alpn_protocol() == "h2":
            self.app = self.h2(self.app)

    def _read(self) -> None:
        # The hot path: one record in, its plaintext to ``app``, no exception (an
        # SSLWantReadError costs more than the decryption of a small record). A read
        # returns one record's plaintext at most, so one shorter than asked for leaves
        # none held in ``obj``: reading stops there when no ciphertext is left in
        # ``inc`` either; a partial record left there ends in SSLWantReadError.
        inc, obj = self.inc, self.obj
        while not self.paused and not self.closing and not self.eof_got:
            try:
                chunk = obj.read(_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify, ours out already
                chunk = b""
            except (ssl.SSLError, OSError):
                self.count("tls_record_error")
                self.abort()
                break
            if not chunk:  # close_notify (``ssl`` reads it as b"" while ours is not out)
                if not self.eof_received():
                    self.close()
                break
            self.app.data_received(chunk)
            if not inc.pending and len(chunk) < _READ:
                break
        if self.out.pending:  # what reading made (a KeyUpdate's answer, an alert)
            self._flush()

    def _flush(self) -> None:
        data = self.out.read()
        if data and not self.raw.is_closing():
            self.raw.write(data)

    def eof_received(self) -> bool | None:
        if not self.ready:
            return False
        if self.eof_got:  # the FIN after a close_notify: app knows
            return True
        self.eof_got = True
        return self.app.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.closing = True
        self.app.connection_lost(exc)

    def pause_writing(self) -> None:
        self.app.pause_writing()

    def resume_writing(self) -> None:
        self.app.resume_writing()

    # --- the transport of ``app`` ----------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or not self.ready or self.eof_sent:
            return
        try:
            self.obj.write(data)
        except (ssl.SSLError, OSError):
            self.abort()
            return
        out = self.out.read()  # _flush, inlined: once per response on the hot path
        if out and not self.raw.is_closing():
            self.raw.write(out)

    def writelines(self, items: Any) -> None:
        self.write(b"".join(items))

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.ready and not self.eof_sent:
            try:
                self.obj.unwrap()  # our close_notify
            except (ssl.SSLError, OSError):
                pass
            self._flush()
        self.raw.close()

    def abort(self) -> None:
        self.closing = True
        self.raw.abort()

    def is_closing(self) -> bool:
        return self.closing or bool(self.raw.is_closing())

    def can_write_eof(self) -> bool:
        return self.ready and not self.closing and not self.eof_sent

    def write_eof(self) -> None:
        """Half-close: our close_notify, then a FIN; what the client sends is still read."""
        if not self.can_write_eof():
            return
        self.eof_sent = True
        try:
            self.obj.unwrap()
        except (ssl.SSLError, OSError):  # SSLWantReadError: the client's close_notify is due
            pass
        self._flush()
        if self.raw.can_write_eof():
            self.raw.write_eof()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.obj
        if name == "peercert":
            return self.obj.getpeercert() if self.ready else default
        return self.raw.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.paused = True
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.paused = False
        self.raw.resume_reading()
        if self.ready:
            asyncio.get_running_loop().call_soon(self._read)

    def is_reading(self) -> bool:
        return not self.paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high=high, low=low)

    def get_write_buffer_size(self) -> int:
        return int(self.raw.get_write_buffer_size()) + self.out.pending
