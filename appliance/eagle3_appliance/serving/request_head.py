"""The grammar of an HTTP/1.x request head, checked on its raw bytes before Sanic parses it.

Why: Sanic's parser is lenient where leniency decides where a request ends. It splits the head
on CRLF only (a bare LF or CR hides a line inside the value before it), splits each line at its
first colon and lower-cases the name unstripped (``Content-Length : 2`` is a header named
``content-length `` that frames nothing), takes a folded line for a header of its own, lets any
byte through in names and values, and reads a chunked body on HTTP/1.0. A proxy in front that
reads any of these the other way disagrees with the server about where the body ends, and the
rest of the body is answered as a second request (request smuggling). So a head is served only
when it is exactly RFC 9112's grammar:

* request line: ``method SP request-target SP HTTP-version``; the method a token, the target
  without whitespace or control characters (RFC 9112 3);
* every line ends with CRLF; no CR or LF elsewhere (RFC 9112 2.2);
* field lines: ``token ":" OWS value OWS``, no whitespace before the colon (RFC 9112 5.1), no
  obsolete line folding (RFC 9112 5.2), values of visible characters, SP, HTAB and obs-text
  only (RFC 9110 5.5: no NUL or other control character);
* no ``Transfer-Encoding`` on HTTP/1.0 (RFC 9112 6.1: its framing is faulty).

Anything else is refused with ``400`` and the connection closed (by the caller).
"""

from __future__ import annotations

import re

__all__ = ["head_problem"]

_TCHARS = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = re.compile(rb"[" + _TCHARS + rb"]+")
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")  # non-ASCII is left to Sanic's own message
_FIELD_LINE = re.compile(rb"[" + _TCHARS + rb"]+:[\t\x20-\x7e\x80-\xff]*")
_NAME_THEN_SPACE = re.compile(rb"[" + _TCHARS + rb"]+[ \t]+:")
# How much of an offending line an error message quotes.
QUOTE_BYTES = 40


def head_problem(head: bytes) -> str | None:
    """What makes ``head`` (request line and field lines, without the final empty line) malformed; None if nothing."""
    unpaired = head.replace(b"\r\n", b"")
    if b"\r" in unpaired or b"\n" in unpaired:
        return "a bare CR or LF in the request head; every line must end with CRLF"
    request_line, *fields = head.split(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        return "the request line must be METHOD SP request-target SP HTTP-version"
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        return f"the method {_quote(method)} is not a token"
    if not _TARGET.fullmatch(target):
        return "the request target contains a control character"
    for line in fields:
        if _FIELD_LINE.fullmatch(line):
            if version == b"HTTP/1.0" and line[:18].lower() == b"transfer-encoding:":
                return "Transfer-Encoding on an HTTP/1.0 request (its framing is faulty, RFC 9112 6.1)"
            continue
        return _field_problem(line)
    return None


def _field_problem(line: bytes) -> str:
    """Why ``line``, which is not a well-formed field line, is refused."""
    if line[:1] in (b" ", b"\t"):
        return f"obsolete line folding (a header line starting with whitespace): {_quote(line)}"
    if _NAME_THEN_SPACE.match(line):
        return f"whitespace between a header name and its colon: {_quote(line)}"
    name, colon, _ = line.partition(b":")
    if not colon:
        return f"a header line without a colon: {_quote(line)}"
    if not _TOKEN.fullmatch(name):
        return f"the header name {_quote(name)} is not a token"
    return f"a control character in the value of header {_quote(name)}"


def _quote(raw: bytes) -> str:
    shown = repr(raw[:QUOTE_BYTES])[1:]  # b'...' -> '...': escapes every control character
    return shown if len(raw) <= QUOTE_BYTES else f"{shown[:-1]}...{shown[-1]} ({len(raw)} bytes)"
