"""Jobs run Beam locally on the in-process FnApiRunner: never on DirectRunner's first choice,
Prism, which downloads a binary at run time."""

from __future__ import annotations

import glob
import os
import tempfile

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.portability import prism_runner

from jobs.beam_options import LOCAL_RUNNER, pipeline_options

JOBS = os.path.join(os.path.dirname(__file__), "..", "..", "jobs")


@pytest.fixture
def prism_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every attempt to run on Prism, refused (as offline) so Beam falls back."""
    calls: list[str] = []

    def refuse(self, pipeline, options):
        calls.append("run")
        raise RuntimeError("Prism is not allowed in tests")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", refuse)
    return calls


def run_squares(options: PipelineOptions, out: str) -> list[int]:
    with beam.Pipeline(options=options) as p:
        _ = (p | beam.Create([1, 2, 3]) | beam.Map(lambda x: x * x)
             | beam.io.WriteToText(out, shard_name_template=""))
    with open(out, encoding="utf-8") as f:
        return sorted(int(line) for line in f)


@pytest.mark.parametrize("args", [[], ["--runner=DirectRunner"],
                                  ["--direct_running_mode=multi_threading",
                                   "--direct_num_workers=2"]])
def test_local_runs_never_reach_prism(tmp_path, prism_calls, args):
    options = pipeline_options(args)
    assert options.view_as(StandardOptions).runner == LOCAL_RUNNER
    assert run_squares(options, str(tmp_path / "out.txt")) == [1, 4, 9]
    assert prism_calls == []


def test_unpinned_direct_runner_tries_prism_first(tmp_path, prism_calls):
    # the behaviour the pin avoids: without it Beam's default runner goes to Prism first
    # (downloading its binary), and only falls back when that fails
    assert run_squares(PipelineOptions([]), str(tmp_path / "out.txt")) == [1, 4, 9]
    assert prism_calls == ["run"]


def test_other_runners_pass_through():
    for runner in ("DataflowRunner", "SparkRunner", "PrismRunner", "FnApiRunner"):
        options = pipeline_options([f"--runner={runner}", "--project=p"])
        assert options.view_as(StandardOptions).runner == runner


def test_no_beam_temp_dirs_left_behind(tmp_path, monkeypatch):
    # an offline Prism attempt leaves an empty beam-temp* directory in the temp dir each run
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run_squares(pipeline_options([]), str(tmp_path / "out.txt"))
    assert glob.glob(str(tmp_path / "beam-temp*")) == []


def test_every_job_builds_its_options_through_the_pin():
    for path in glob.glob(os.path.join(JOBS, "*.py")):
        if path.endswith("beam_options.py"):
            continue
        with open(path, encoding="utf-8") as f:
            source = f.read()
        assert "PipelineOptions(" not in source, f"{path}: use jobs.beam_options.pipeline_options"
