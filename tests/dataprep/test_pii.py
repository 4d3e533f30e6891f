"""PII redaction: placeholders, counts per kind, public addresses only."""

from dataprep.pii import PIIConfig, PIIRedactor


def test_redacts_emails_and_public_ips_with_counts():
    text = ("Write to ada@lovelace.example or bob.smith+news@mail.co.uk. Server 8.8.8.8 and "
            "2606:4700:4700::1111 answered; 10.0.0.1, 192.168.1.20 and ::1 are private.")
    out, counts = PIIRedactor(PIIConfig()).redact(text)
    assert out.count("<EMAIL_ADDRESS>") == 2 and out.count("<IP_ADDRESS>") == 2
    assert "10.0.0.1" in out and "192.168.1.20" in out and "::1" in out
    assert dict(counts) == {"email": 2, "ip": 2}


def test_documentation_ranges_and_non_addresses_are_kept():
    text = "See 192.0.2.7, 198.51.100.1, 203.0.113.9 and 2001:db8::42; it is 12:30:45, v1.2.3.4.5."
    out, counts = PIIRedactor(PIIConfig()).redact(text)
    assert out == text and not counts


def test_phones_are_opt_in_and_switches_work():
    text = "Call +1 415-555-0100 or (020) 7946 0958, mail x@y.example."
    out, counts = PIIRedactor(PIIConfig()).redact(text)
    assert "415-555-0100" in out and counts == {"email": 1}
    out, counts = PIIRedactor(PIIConfig(phones=True, emails=False)).redact(text)
    assert out.count("<PHONE_NUMBER>") == 2 and "x@y.example" in out and counts == {"phone": 2}
    assert PIIRedactor(PIIConfig(enabled=False)).redact(text) == (text, {})
