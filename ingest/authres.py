"""Authentication-Results (RFC 8601): the verdicts our own MTA wrote, and only those.

Anyone can write an `Authentication-Results` header into a mail, so a header counts only when
its authserv-id (the first word) is the configured `authserv_id`, and only in the topmost run of
such headers: our MTA is the last hop and prepends, so a header below one from another server
came with the mail. Per method the topmost trusted header that states it wins, so a forged
`dmarc=pass` written under our MTA's real `dmarc=fail` never counts. The MTA must also remove
incoming headers that carry its own authserv-id (RFC 8601 section 5; docs/deploy.md shows how).

Reading is linear in the header's length: one pass that drops comments (nested too) and
splits at the semicolons outside quoted strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

HEADER = "authentication-results"


@dataclass(frozen=True)
class AuthResult:
    """One `method=result` of a header, with its properties (`header.d`, `smtp.mailfrom`)."""

    method: str
    result: str
    properties: dict[str, str] = field(default_factory=dict)

    def domain(self) -> str | None:
        """The domain the result is about: DKIM's signing domain (`header.d`, or `header.i`'s
        domain), SPF's envelope sender (`smtp.mailfrom`, else `smtp.helo`), DMARC's From domain."""
        for key in ("header.d", "header.i", "smtp.mailfrom", "smtp.helo", "header.from"):
            value = self.properties.get(key)
            if value:
                return value.rpartition("@")[2].strip(".").lower() or None
        return None


def _clauses(value: str) -> list[str]:
    """`value` without comments, split at the semicolons outside quoted strings."""
    parts: list[str] = []
    current: list[str] = []
    depth, quoted, escaped = 0, False, False
    for char in value:
        if escaped:
            escaped = False
            if depth == 0:
                current.append(char)
        elif char == "\\":
            escaped = True
        elif quoted:
            quoted = char != '"'
            current.append(char)
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif depth:
            continue
        elif char == '"':
            quoted = True
            current.append(char)
        elif char == ";":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts]


def authserv_id_of(value: str) -> str:
    """The authserv-id of a header value: its first word (a version may follow), lower case."""
    words = _clauses(value)[0].split()
    return words[0].lower() if words else ""


def results_of(value: str) -> list[AuthResult]:
    """The `method=result` clauses of one header value (none for `authserv-id; none`)."""
    found = []
    for clause in _clauses(value)[1:]:
        words = clause.split()
        if not words or "=" not in words[0]:
            continue
        method, _, result = words[0].partition("=")
        properties = {}
        for word in words[1:]:
            key, sep, prop = word.partition("=")
            if sep and "." in key:
                properties[key.lower()] = prop.strip('"')
        method = method.partition("/")[0].strip().lower()
        found.append(AuthResult(method, result.strip().lower(), properties))
    return found


def trusted_results(headers: list[tuple[str, str]], authserv_id: str | None) -> list[AuthResult]:
    """The results our MTA (`authserv_id`) wrote, topmost first: from the topmost run of its
    headers, and per method only from the topmost header stating that method. Nothing without
    an `authserv_id`: an unnamed server's header proves nothing."""
    if not authserv_id:
        return []
    wanted = authserv_id.strip().lower()
    trusted: list[AuthResult] = []
    decided: set[str] = set()
    for name, value in headers:
        if name.lower() != HEADER:
            continue
        if authserv_id_of(value) != wanted:
            break  # below another server's header: it came with the mail
        results = results_of(value)
        trusted += [r for r in results if r.method not in decided]
        decided |= {r.method for r in results}
    return trusted


def verdicts(results: list[AuthResult]) -> dict[str, set[str]]:
    """The results per method: {"dkim": {"pass", "fail"}, ...}."""
    found: dict[str, set[str]] = {}
    for result in results:
        found.setdefault(result.method, set()).add(result.result)
    return found


def passed_for(results: list[AuthResult], method: str, domains: list[str]) -> bool:
    """True if `method` passed for one of `domains` or a subdomain of one."""
    wanted = [d.strip(".").lower() for d in domains]
    for result in results:
        domain = result.domain() if result.method == method and result.result == "pass" else None
        if domain and any(domain == d or domain.endswith("." + d) for d in wanted):
            return True
    return False


def with_own_results(
    headers: list[tuple[str, str]], value: str, authserv_id: str
) -> list[tuple[str, str]]:
    """`headers` with mailintake's own verdict (config `verify`) on top and every header carrying
    our authserv-id that came with the mail removed, as an MTA must (RFC 8601 section 5): our
    computed verdict is then the only one `trusted_results` reads."""
    wanted = authserv_id.strip().lower()
    kept = [(n, v) for n, v in headers if n.lower() != HEADER or authserv_id_of(v) != wanted]
    return [("Authentication-Results", value), *kept]
