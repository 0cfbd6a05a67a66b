"""`unicorn`: register seed shards and run the pipeline in-process on a persistent Dagster instance.

The Dagster CLI cannot create dynamic partitions; this can. Runs land in DAGSTER_HOME, so
`dagster dev` shows them afterwards.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Unicorn: text-only VLM training data, as Dagster assets.")


def _instance():
    import dagster as dg

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        home = str(Path(".dagster_home").resolve())
        os.environ["DAGSTER_HOME"] = home
    Path(home).mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.get()


def _defs():
    from dagster_project.definitions import defs

    return defs


def _register(instance, defs) -> list[str]:
    from dagster_project.partitions import SEED_SHARDS

    shards, problems = defs.resources["seeds"].shards()
    for problem in problems:
        typer.secho(f"skipped: {problem}", fg=typer.colors.YELLOW, err=True)
    known = set(instance.get_dynamic_partitions(SEED_SHARDS))
    new = [k for k in shards if k not in known]
    if new:
        instance.add_dynamic_partitions(SEED_SHARDS, new)
    return sorted(shards)


@app.command()
def shards() -> None:
    """List the seed shards (partition keys) of the configured seed location."""
    found, problems = _defs().resources["seeds"].shards()
    for key, uri in sorted(found.items()):
        typer.echo(f"{key}\t{uri}")
    for problem in problems:
        typer.secho(f"skipped: {problem}", fg=typer.colors.YELLOW, err=True)


@app.command()
def register() -> None:
    """Add every seed file of the seed location as a dynamic partition."""
    keys = _register(_instance(), _defs())
    typer.echo(f"{len(keys)} shard(s) registered: {', '.join(keys)}")


def run_shards(keys: list[str] | None = None, job: str = "unicorn_shard_job") -> dict:
    """Register the shards and run `job` once per shard; returns a summary dict."""
    instance, defs = _instance(), _defs()
    registered = _register(instance, defs)
    keys = keys or registered
    unknown = sorted(set(keys) - set(registered))
    if unknown:
        raise typer.BadParameter(f"no seed file for shard(s) {unknown}; known: {registered}")
    job_def = defs.get_job_def(job)
    runs = {}
    for key in keys:
        started = time.perf_counter()
        result = job_def.execute_in_process(instance=instance, partition_key=key,
                                            raise_on_error=False)
        failed_checks = [
            f"{e.asset_check_evaluation_data.asset_check_key.asset_key.to_user_string()}:"
            f"{e.asset_check_evaluation_data.asset_check_key.name}"
            for e in result.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
            and not e.asset_check_evaluation_data.passed
        ]
        runs[key] = {"run_id": result.run_id, "success": result.success,
                     "seconds": time.perf_counter() - started, "failed_checks": failed_checks}
    return {"instance": os.environ["DAGSTER_HOME"], "runs": runs}


def summarise(summary: dict) -> str:
    import polars as pl

    io = _defs().resources["io_manager"]
    lines = []
    totals = {"seeds_read": 0, "seeds": 0, "captions": 0}
    rejected: dict[str, int] = {}
    for key, run in summary["runs"].items():
        row = {"seeds_read": 0, "seeds": 0, "captions": 0}
        for asset, field in (("caption_seeds", "seeds"), ("expanded_captions", "captions")):
            try:
                row[field] = pl.scan_parquet(io.uri(asset, key)).select(pl.len()).collect().item()
            except (FileNotFoundError, OSError, pl.exceptions.ComputeError):
                pass
        try:
            rej = pl.read_parquet(io.uri("expanded_caption_rejects", key))
            for reason, n in rej.group_by("reason").len().iter_rows():
                rejected[reason] = rejected.get(reason, 0) + n
            seed_rej = pl.read_parquet(io.uri("caption_seed_rejects", key))
            row["seeds_read"] = row["seeds"] + seed_rej.height
        except (FileNotFoundError, OSError, pl.exceptions.ComputeError):
            pass
        for k in totals:
            totals[k] += row[k]
        status = "ok" if run["success"] else "FAILED"
        checks = f"; failed checks: {', '.join(run['failed_checks'])}" if run["failed_checks"] else ""
        lines.append(f"  {key:<28} {status:<6} seeds {row['seeds']:>4}  captions "
                     f"{row['captions']:>4}  {run['seconds']:6.1f}s{checks}")
    lines.insert(0, f"{len(summary['runs'])} shard(s):")
    lines.append(f"seed lines read: {totals['seeds_read']}, seeds kept: {totals['seeds']}, "
                 f"captions kept: {totals['captions']}")
    lines.append("captions rejected by reason: " + (", ".join(
        f"{r}={n}" for r, n in sorted(rejected.items())) or "none"))
    return "\n".join(lines)


@app.command()
def materialize(shard: list[str] = typer.Option(None, help="shard key(s); default: all"),
                job: str = typer.Option("unicorn_shard_job", help="the job to run per shard")) -> None:
    """Register the shards, then materialise the per-shard pipeline for each of them."""
    started = time.perf_counter()
    summary = run_shards(shard, job)
    typer.echo(summarise(summary))
    typer.echo(f"wall time: {time.perf_counter() - started:.1f}s")
    if not all(r["success"] for r in summary["runs"].values()):
        raise typer.Exit(1)


@app.command()
def demo() -> None:
    """Run the bundled seeds through the pipeline with the offline models, then summarise."""
    started = time.perf_counter()
    defs = _defs()
    res = defs.resources
    typer.echo(f"seeds: {res['seeds'].location}\nmodel: {res['llm'].model_id}"
               f"{'' if res['llm'].is_trained_model else ' (untrained stand-in)'}")
    summary = run_shards()
    typer.echo(summarise(summary))
    base = Path(res["io_manager"].base_uri).resolve()
    typer.echo(f"results: {base} (Parquet), catalog: {base / 'catalog.duckdb'}")
    typer.echo(f"runs: DAGSTER_HOME={summary['instance']} (see them with `dagster dev`)")
    typer.echo(f"wall time: {time.perf_counter() - started:.1f}s")
    if not all(r["success"] for r in summary["runs"].values()):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
