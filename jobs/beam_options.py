"""Beam pipeline options for every job, with the local runner pinned to one that stays offline.

Beam's `DirectRunner` (the default when `--runner` is not given) first tries the Prism runner,
which downloads a Go binary from GitHub at run time (apache_beam 2.77:
`runners/direct/direct_runner.py`), and falls back to the in-process `FnApiRunner` only when
that fails. So an unpinned local run reaches the network, runs on a different runner depending
on whether it could, and, offline, leaves an empty `beam-temp*` directory in the temp dir each
time. Jobs therefore run on `FnApiRunner` when no runner is named, or when `DirectRunner` is:
the runner `DirectRunner` ends up on for every transform these jobs use, with the same
`--direct_num_workers` / `--direct_running_mode` options. Any other runner (Dataflow, Spark,
Flink, Prism itself) passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from kiln.log import get_logger

log = get_logger(__name__)

LOCAL_RUNNER = "FnApiRunner"
_REDIRECTED = {None, "DirectRunner", "SwitchingDirectRunner"}


def pipeline_options(beam_args: Sequence[str]):
    """`PipelineOptions` from the job's pass-through Beam flags, the local runner pinned."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    options = PipelineOptions(list(beam_args))
    standard = options.view_as(StandardOptions)
    if standard.runner in _REDIRECTED:
        if standard.runner is not None:
            log.info("--runner=%s would first download Beam's Prism runner: running %s, "
                     "the in-process runner it falls back to", standard.runner, LOCAL_RUNNER)
        standard.runner = LOCAL_RUNNER
    return options


__all__ = ["LOCAL_RUNNER", "pipeline_options"]
