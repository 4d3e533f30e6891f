"""Remake the PPO/GRPO sample prompts for `tiny-{ppo,grpo}.yaml` (`sample-prompts/`).

The prompts are the conversations of the HH-RLHF sample in `jobs/sample_data/` up to their
final assistant header, written by the project's own `kiln preference --format prompts` with the
committed `tokenizer-hh` (so the fingerprint matches the other sample shards). Beam runs locally.

    python trainer/configs/data/make_rl_prompts.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from make_chat_shards import BEAM, SAMPLES, hh_prompts, hh_rows, write_jsonl  # noqa: E402

from jobs import preference  # noqa: E402


def prompt_records(rows: list[dict]) -> list[dict]:
    """Each HH conversation's prompt (every turn before the compared replies) as chat messages."""
    return [{"prompt": prompt} for prompt, _ in hh_prompts(rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.relpath(HERE, ROOT))
    parser.add_argument("--records", type=int, default=240, help="HH-RLHF records to read")
    parser.add_argument("--max-tokens", type=int, default=48, help="longest prompt kept")
    args = parser.parse_args()
    os.chdir(ROOT)  # relative paths in the manifest: the same on every clone
    tok_dir = os.path.join(args.out, "tokenizer-hh")
    out = os.path.join(args.out, "sample-prompts")
    tmp = os.path.join(args.out, "rl-inputs")
    os.makedirs(tmp, exist_ok=True)
    try:
        prompts = write_jsonl(os.path.join(tmp, "hh-prompts.jsonl"),
                              prompt_records(hh_rows(args.records)))
        shutil.rmtree(out, ignore_errors=True)
        preference.main(["--tokenizer", tok_dir, "--out", out, "--input", prompts,
                         "--format", "prompts", "--set",
                         f"length.max_total_tokens={args.max_tokens}", *BEAM])
        shutil.copy(os.path.join(SAMPLES, "hh-rlhf-LICENSE"), os.path.join(out, "LICENSE-hh-rlhf"))
        with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
            print(f"sample-prompts: {json.load(f)['rows']} rows")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
