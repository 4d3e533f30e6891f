"""Logging set-up: our INFO lines, third parties' only from WARNING, expected warnings silent."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.trainer.conftest import ROOT, child_env

SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    from kiln.log import get_logger, setup_logging
    setup_logging(sys.argv[1])
    get_logger("trainer.loop").info("ours")
    get_logger("megatron.core.optimizer").info("megatron info")
    get_logger("megatron.core.optimizer").warning("megatron warning")
    exec(compile('import warnings; warnings.warn("Apex is not installed. Falling back")',
                 "megatron_module", "exec"), {"__name__": "megatron.core.models.backends"})
    warnings.warn("something else")
""")


def _stderr(level: str) -> str:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, level], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_third_party_info_is_quiet_and_expected_warnings_silent() -> None:
    err = _stderr("INFO")
    assert "ours" in err and "megatron warning" in err and "something else" in err
    assert "megatron info" not in err and "Apex is not installed" not in err


def test_debug_shows_third_party_info() -> None:
    assert "megatron info" in _stderr("DEBUG")
