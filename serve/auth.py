"""Who may call what: bearer tokens with roles, the same on both ports.

    --auth-tokens FILE      one token per line: TOKEN ROLE[,ROLE...]; '#' starts a comment
                            roles: infer    inference, Classify, metadata, statistics, the model list
                                   control  the repository: index, load, unload

    authorizer = Authorizer(TokenFile("tokens.txt"), control_open=False)
    authorizer.check("Bearer s3cret", "control")     # raises UnauthenticatedError / PermissionDeniedError

With a token file every endpoint of both ports needs `Authorization: Bearer TOKEN` (gRPC metadata
`authorization`), except liveness and readiness (Kubernetes probes: HTTP /v2/health/live and /ready,
V2 ServerLive and ServerReady, grpc.health.v1), the web page's own files (HTML, CSS, JavaScript: no model
data; every call the page makes carries the token the user typed) and the metrics port. No token or an
unknown one: HTTP 401 / UNAUTHENTICATED; a token without the role: 403 / PERMISSION_DENIED; nothing of
the refused call runs. Tokens are compared in constant time (their SHA-256 digests, with
hmac.compare_digest, against every known token) and never logged. The file is read again when it
changes (checked at most once a second), so a rotation is: add the new token, move the clients, remove the
old one; a file that no longer parses keeps the tokens read before, and says why in the log.

Without a token file, inference is open and the repository's control calls (load, unload) are refused
unless the server listens on loopback only or `--allow-unauthenticated-control` is given.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from pathlib import Path

from .errors import ConfigError, PermissionDeniedError, UnauthenticatedError

log = logging.getLogger(__name__)

INFER, CONTROL = "infer", "control"
ROLES = (INFER, CONTROL)
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def parse_tokens(text: str, source: str = "the token file") -> dict[bytes, frozenset[str]]:
    """{sha256(token): roles} from the file's text; ConfigError naming the line of a bad entry."""
    tokens: dict[bytes, frozenset[str]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{source} line {number}: expected 'TOKEN ROLE[,ROLE...]' (two fields), found "
                              f"{len(parts)} field(s)")
        token, roles_text = parts
        roles = frozenset(r.strip() for r in roles_text.split(",") if r.strip())
        unknown = sorted(roles - set(ROLES))
        if not roles or unknown:
            raise ConfigError(f"{source} line {number}: unknown role(s) {unknown or roles_text!r}; expected "
                              f"{' or '.join(ROLES)} (comma-separated)")
        if len(token) < 8:
            raise ConfigError(f"{source} line {number}: a token of {len(token)} characters; expected at least 8")
        tokens[_digest(token)] = tokens.get(_digest(token), frozenset()) | roles
    return tokens


class TokenFile:
    """The tokens of a file, read again when the file changes (at most once per `check_every_s`)."""

    def __init__(self, path: str | Path, check_every_s: float = 1.0):
        self.path = Path(path)
        self.check_every_s = check_every_s
        self._lock = threading.Lock()
        self._stamp = None
        self._checked = 0.0
        try:
            self._tokens = self._read()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {self.path}: {exc.strerror}") from None
        if not self._tokens:
            raise ConfigError(f"the token file {self.path} holds no token; expected lines 'TOKEN ROLE[,ROLE...]'")

    def _stat(self):
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> dict[bytes, frozenset[str]]:
        stamp = self._stat()
        tokens = parse_tokens(self.path.read_text(), str(self.path))
        self._stamp = stamp
        return tokens

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.check_every_s:
            return
        self._checked = now
        try:
            if self._stat() == self._stamp:
                return
            tokens = self._read()
        except (OSError, ConfigError) as exc:
            log.error("token file %s: %s; the tokens read before stay valid", self.path, exc)
            try:
                self._stamp = self._stat()  # logged once per change of the file
            except OSError:
                pass
            return
        self._tokens = tokens
        log.info("token file %s read again: %d token(s)", self.path, len(tokens))

    def roles(self, token: str) -> frozenset[str] | None:
        """The roles of `token`, or None when it is not in the file (constant time over the known tokens)."""
        with self._lock:
            self._refresh()
            known = self._tokens
        given = _digest(token)
        found = None
        for digest, roles in known.items():
            if hmac.compare_digest(digest, given):
                found = roles
        return found


class Authorizer:
    """Decides each call: `check(authorization header, role)` raises when it may not run."""

    def __init__(self, tokens: TokenFile | None = None, *, control_open: bool = False):
        self.tokens = tokens
        self.control_open = control_open

    @property
    def enabled(self) -> bool:
        return self.tokens is not None

    def check(self, authorization: str | None, role: str, changes: bool = False) -> None:
        """`changes`: the call loads or unloads (refused without a token file unless control is open)."""
        if self.tokens is None:
            if changes and not self.control_open:
                raise PermissionDeniedError(
                    "model control (load, unload) is refused on a server listening beyond loopback without "
                    "--auth-tokens; start it with --auth-tokens FILE (or --allow-unauthenticated-control)")
            return
        token = bearer(authorization)
        if token is None:
            raise UnauthenticatedError("this server needs a token: send 'Authorization: Bearer TOKEN' (gRPC metadata "
                                       "'authorization')")
        roles = self.tokens.roles(token)
        if roles is None:
            raise UnauthenticatedError("the token was not accepted (unknown or revoked)")
        if role not in roles:
            raise PermissionDeniedError(f"the token lacks the '{role}' role this call needs (it has: "
                                        f"{', '.join(sorted(roles))})")


def bearer(authorization: str | None) -> str | None:
    """The token of an 'Authorization: Bearer TOKEN' value (None when absent or of another scheme)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# ---- which role each call needs -----------------------------------------------------------------------------
GRPC_OPEN = {"ServerLive", "ServerReady"}  # probes (and grpc.health.v1.Health/*, a service of its own)
GRPC_CONTROL = {"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"}
GRPC_CHANGES = {"RepositoryModelLoad", "RepositoryModelUnload"}


def grpc_role(method: str) -> tuple[str | None, bool]:
    """'/inference.GRPCInferenceService/ModelInfer' -> ('infer', False): the role a call needs (None: no
    token) and whether it loads or unloads."""
    service, _, name = method.lstrip("/").rpartition("/")
    if service == "grpc.health.v1.Health" or name in GRPC_OPEN:
        return None, False
    return (CONTROL if name in GRPC_CONTROL else INFER), name in GRPC_CHANGES


HTTP_OPEN_PATHS = {"/v2/health/live", "/v2/health/ready", "/", "/index.html"}


def http_role(path: str) -> tuple[str | None, bool]:
    """The role an HTTP path needs (None for probes and the page's own files), and whether it loads or unloads."""
    if path in HTTP_OPEN_PATHS or path.startswith("/static/"):
        return None, False
    if path.startswith("/v2/repository/"):
        return CONTROL, path.endswith(("/load", "/unload"))
    return INFER, False


def grpc_interceptor(authorizer: Authorizer):
    """A grpc.ServerInterceptor that refuses calls before they run (UNAUTHENTICATED / PERMISSION_DENIED)."""
    import grpc

    from .errors import status_of

    class _Interceptor(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            role, changes = grpc_role(details.method)
            if role is None:
                return continuation(details)
            header = None
            for key, value in details.invocation_metadata or ():
                if key == "authorization":
                    header = value
                    break
            try:
                authorizer.check(header, role, changes)
            except (UnauthenticatedError, PermissionDeniedError) as exc:
                code, message = grpc.StatusCode[status_of(exc)[0]], str(exc)
                log.info("refused %s: %s", details.method, code.name)

                def refuse(request, context):
                    context.abort(code, message)

                handler = continuation(details)
                if handler is None:
                    return None
                make = {(False, False): grpc.unary_unary_rpc_method_handler,
                        (False, True): grpc.unary_stream_rpc_method_handler,
                        (True, False): grpc.stream_unary_rpc_method_handler,
                        (True, True): grpc.stream_stream_rpc_method_handler}
                return make[(bool(handler.request_streaming), bool(handler.response_streaming))](refuse)
            return continuation(details)

    return _Interceptor()


__all__ = ["Authorizer", "CONTROL", "INFER", "ROLES", "TokenFile", "bearer", "grpc_interceptor", "grpc_role",
           "http_role", "is_loopback", "parse_tokens"]
