"""PII redaction: e-mail and IP addresses (and optionally phone numbers) become placeholders, with
a count per kind. The e-mail pattern is datatrove's PIIFormatter's, its IPv4 pattern gets word boundaries;
IPv6 and phones are ours.

Only globally routable addresses are redacted (`ipaddress.is_global`, as datatrove's default
`only_remove_public_ips`): private, loopback, link-local and the documentation ranges
(192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) identify nobody, and keeping them
keeps networking tutorials and manuals readable.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass

from datatrove.pipeline.formatters.pii import PIIFormatter


@dataclass
class PIIConfig:
    enabled: bool = True
    emails: bool = True
    ips: bool = True
    phones: bool = False  # phone patterns also hit version strings, dates and ids; opt in
    email_placeholder: str = "<EMAIL_ADDRESS>"
    ip_placeholder: str = "<IP_ADDRESS>"
    phone_placeholder: str = "<PHONE_NUMBER>"


_DATATROVE = PIIFormatter()
EMAIL = _DATATROVE.emails_replacer.regex
# datatrove's IPv4 pattern, bounded so that "v1.2.3.4.5" or "10.1.2.3.4" are not addresses
IPV4 = re.compile(rf"(?<![\w.]){_DATATROVE.ip_replacer.regex.pattern}(?!\.?\d)(?!\w)")
# candidate IPv6 tokens (hex groups with colons); `ipaddress` decides what is really an address
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|"
                  r"(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
# international (+CC ...) or North-American style numbers with separators
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"
                   r"\d{3,4}[ .-]\d{3,4}(?![\w-])")


def _is_global(candidate: str) -> bool:
    try:
        return ipaddress.ip_address(candidate).is_global
    except ValueError:
        return False


class PIIRedactor:
    """`redact(text) -> (text, {"email": n, "ip": n, "phone": n})`."""

    def __init__(self, config: PIIConfig) -> None:
        self.config = config

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        counts: Counter[str] = Counter()
        c = self.config
        if not c.enabled:
            return text, counts
        if c.emails:
            text = self._sub(EMAIL, text, c.email_placeholder, "email", counts)
        if c.ips:
            text = self._sub(IPV4, text, c.ip_placeholder, "ip", counts, _is_global)
            text = self._sub(IPV6, text, c.ip_placeholder, "ip", counts, _is_global)
        if c.phones:
            text = self._sub(PHONE, text, c.phone_placeholder, "phone", counts)
        return text, counts

    @staticmethod
    def _sub(pattern: re.Pattern, text: str, placeholder: str, kind: str,
             counts: Counter[str], valid=None) -> str:
        def replace(match: re.Match) -> str:
            if valid is not None and not valid(match.group(0)):
                return match.group(0)
            counts[kind] += 1
            return placeholder

        return pattern.sub(replace, text)
