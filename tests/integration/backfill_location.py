"""A code location for test_backfill: seeds and Stage 1 over the folders named by the environment,
with an LLM that writes a line to a file each time it is set up (once per run, not per shard)."""

import os
from pathlib import Path

import dagster as dg

from dagster_project.jobs import unicorn_shard_job
from tests.support import make_resources
from unicorn_assets.caption_seeds import read_caption_seeds
from unicorn_assets.expansion import expand_captions
from unicorn_resources.llm import FakeLLM


class SetupCountingLLM(FakeLLM):
    setup_log: str

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        super().setup_for_execution(context)
        Path(self.setup_log).parent.mkdir(parents=True, exist_ok=True)
        with open(self.setup_log, "a") as handle:
            handle.write(f"{context.run_id}\n")


data = Path(os.environ["UNICORN_TEST_DATA"])
resources = make_resources(data, os.environ["UNICORN_TEST_SEEDS"], llm=SetupCountingLLM(
    setup_log=str(data / "llm_setups.log"), cache_path=str(data / "llm_cache.sqlite")))
defs = dg.Definitions(assets=[read_caption_seeds, expand_captions],
                      jobs=[unicorn_shard_job],
                      resources=resources, executor=dg.in_process_executor)
