"""`unicorn`: register seed shards and run the pipeline in-process on a persistent Dagster instance.

The Dagster CLI cannot create dynamic partitions; this can. Runs land in DAGSTER_HOME, so
`dagster dev` shows them afterwards.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    import dagster as dg

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Unicorn: text-only VLM training data, as Dagster assets.")


def _instance():
    """The instance of DAGSTER_HOME, created under its lock; runs of this host whose process
    died (killed, crashed) are marked failed first, with a line on stderr for each."""
    from dagster_project.instance import fail_dead_runs, open_instance

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        home = str(Path(".dagster_home").resolve())
        os.environ["DAGSTER_HOME"] = home
    Path(home).mkdir(parents=True, exist_ok=True)
    config = Path(home) / "dagster.yaml"
    if not config.exists():  # else Dagster warns on every command that it uses the defaults
        config.write_text("# Dagster instance settings (none: SQLite storage in this folder).\n"
                          "# See https://docs.dagster.io/deployment/oss/dagster-yaml\n")
    instance = open_instance(home)
    for run, message in fail_dead_runs(instance):
        typer.secho(f"run {run.run_id} ({run.job_name}"
                    + (f", shard {run.tags['dagster/partition']}"
                       if "dagster/partition" in run.tags else "")
                    + f") marked failed: {message}", fg=typer.colors.YELLOW, err=True)
    return instance


def _run_tags() -> dict[str, str]:
    from dagster_project.instance import run_tags

    return run_tags()


def _defs():
    from dagster_project.profiles import ProfileError

    try:
        from dagster_project.definitions import defs
    except ProfileError as err:  # a wrong profile: its message names the file, setting and fix
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    return defs


def _register(instance, defs) -> list[str]:
    from dagster_project.instance import home_lock
    from unicorn_assets.partitions import SEED_SHARDS

    shards, problems = defs.resources["seeds"].shards()
    for problem in problems:
        typer.secho(f"skipped: {problem}", fg=typer.colors.YELLOW, err=True)
    with home_lock(os.environ["DAGSTER_HOME"]):  # two commands never add the same key twice
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


class RunOutput:
    """What a `unicorn` command shows while it runs jobs. Quiet (the default): one progress bar
    per shard and job on a terminal (one line per finished stage otherwise), and the Dagster
    event log (with everything else the run writes to stderr) goes to a file under
    `<data dir>/logs/`. Verbose: the event log on the terminal, as Dagster prints it."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.log_path: Path | None = None
        self.out = sys.stdout
        self._progress = None

    def _log_file(self) -> Path:
        if self.log_path is None:
            base = _defs().resources["io_manager"].base_uri
            folder = (Path(base) if "://" not in base else Path(os.environ["DAGSTER_HOME"]))
            self.log_path = (folder / "logs" / f"unicorn-{time.strftime('%Y%m%d-%H%M%S')}"
                             f"-{os.getpid()}.log").resolve()
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            typer.echo(f"event log: {self.log_path} (--verbose shows it here)")
        return self.log_path

    @contextmanager
    def run_logs(self) -> Iterator[None]:
        """Send what the run writes to stderr (fd 2: Dagster's console log, library warnings,
        native code) to the log file, unless verbose."""
        if self.verbose:
            yield
            return
        with open(self._log_file(), "a", buffering=1) as log:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)

    def _live(self) -> bool:
        return not self.verbose and self.out.isatty()

    def start(self, label: str, steps: list[str]):
        if not self.verbose:
            self._log_file()  # its path is printed before any progress bar
        if self._live():
            if self._progress is None:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                self._progress = Progress(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(file=self.out),
                    redirect_stdout=False, redirect_stderr=False)
                self._progress.start()
            return self._progress.add_task(f"{label}: starting", total=len(steps), label=label)
        return {"label": label, "started": {}, "stages": set()}

    def event(self, task, event: dg.DagsterEvent) -> None:
        """Advance the bar of `task` by a finished step; without a bar, print a line for each
        finished stage (a step that materialised an asset) and each failed step."""
        kind, step = event.event_type_value, event.step_key
        if self._progress is not None:
            label = self._progress.tasks[task].fields["label"]
            if kind == "STEP_START":
                self._progress.update(task, description=f"{label}: {step}")
            elif kind in ("STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED"):
                self._progress.update(task, advance=1)
            return
        if kind == "STEP_START":
            task["started"][step] = time.perf_counter()
        elif kind == "ASSET_MATERIALIZATION":
            task["stages"].add(step)
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE") and (
                step in task["stages"] or kind == "STEP_FAILURE"):
            seconds = time.perf_counter() - task["started"].get(step, time.perf_counter())
            status = "ok" if kind == "STEP_SUCCESS" else "FAILED"
            self.out.write(f"  {task['label']:<24} {step:<28} {status:<6} {seconds:6.1f}s\n")
            self.out.flush()

    def finish(self, task, ok: bool, checks_failed: int) -> None:
        status = ("ok" if ok else "FAILED") + (f", {checks_failed} check(s) failed"
                                               if checks_failed else "")
        if self._progress is not None:
            label = self._progress.tasks[task].fields["label"]
            self._progress.update(task, description=f"{label}: {status}")
        else:
            self.out.write(f"  {task['label']:<24} {'(run)':<28} {status}\n")
            self.out.flush()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


OUTPUT = RunOutput()
VERBOSE = typer.Option(False, "--verbose", "-v", help="print the Dagster event log here instead "
                       "of to <data dir>/logs/unicorn-<time>.log")


def execute_job(instance: dg.DagsterInstance, job_def: dg.JobDefinition,
                partition_key: str | None = None) -> dict:
    """Run `job_def` in this process as a run of the `unicorn` code location (so the UI can
    re-execute it and shows it on its timeline), tagged with this process (dead-run detection).
    Returns run_id, success, seconds, failed_checks, errors (one line per failed step) and
    events (the run's Dagster events)."""
    import dagster as dg

    from dagster_project.dagster_internal import create_located_run, execute_located_run

    started = time.perf_counter()
    run, recon_job, steps = create_located_run(instance, job_def, _run_tags(), partition_key)
    label = f"{partition_key} {job_def.name}" if partition_key else job_def.name
    task = OUTPUT.start(label, steps)
    events = []
    with OUTPUT.run_logs():
        for event in execute_located_run(instance, run, recon_job):
            events.append(event)
            OUTPUT.event(task, event)
    final = instance.get_run_by_id(run.run_id)
    success = final is not None and final.status == dg.DagsterRunStatus.SUCCESS
    failed_checks = _failed_checks(events)
    OUTPUT.finish(task, success, len(failed_checks))
    errors = [f"{e.step_key}: {e.step_failure_data.error.message.strip().splitlines()[0]}"
              for e in events if e.event_type_value == "STEP_FAILURE"
              and e.step_failure_data.error is not None]
    return {"run_id": run.run_id, "success": success, "seconds": time.perf_counter() - started,
            "failed_checks": failed_checks, "errors": errors, "events": events}


def _report_errors(label: str, outcome: dict) -> None:
    for error in outcome["errors"]:
        typer.secho(f"{label}: {error}", fg=typer.colors.RED, err=True)
    if not outcome["success"]:
        where = f" (event log: {OUTPUT.log_path})" if OUTPUT.log_path else ""
        typer.secho(f"{label}: run {outcome['run_id']} FAILED{where}", fg=typer.colors.RED,
                    err=True)


def run_shards(keys: list[str] | None = None, job: str = "unicorn_shard_job") -> dict:
    """Register the shards and run `job` once per shard; returns a summary dict."""
    instance, defs = _instance(), _defs()
    registered = _register(instance, defs)
    keys = keys or registered
    unknown = sorted(set(keys) - set(registered))
    if unknown:
        raise typer.BadParameter(f"no seed file for shard(s) {unknown}; known: {registered}")
    job_def = defs.resolve_job_def(job)
    runs = {}
    try:
        for key in keys:
            runs[key] = execute_job(instance, job_def, key)
    finally:
        OUTPUT.close()
    for key, run in runs.items():
        _report_errors(f"shard {key}", run)
    return {"instance": os.environ["DAGSTER_HOME"], "runs": runs}


def _failed_checks(events: list[dg.DagsterEvent]) -> list[str]:
    return [f"{e.asset_check_evaluation_data.asset_check_key.asset_key.to_user_string()}:"
            f"{e.asset_check_evaluation_data.asset_check_key.name}"
            for e in events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
            and not e.asset_check_evaluation_data.passed]


def _materializations(events: list[dg.DagsterEvent]) -> dict[str, dict]:
    """{asset key: its metadata values} of the materialisations among `events`."""
    out = {}
    for event in events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            materialization = event.step_materialization_data.materialization
            out[materialization.asset_key.to_user_string()] = {
                k: v.value for k, v in materialization.metadata.items()}
    return out


def run_corpus(job: str = "unicorn_corpus_job") -> dict:
    """Run the corpus-wide job (statistics, transfer, exports) over every shard."""
    instance, defs = _instance(), _defs()
    try:
        outcome = execute_job(instance, defs.resolve_job_def(job))
    finally:
        OUTPUT.close()
    _report_errors(job, outcome)
    return {**outcome, "assets": _materializations(outcome["events"])}


def summarise_corpus(corpus: dict) -> str:
    assets = corpus["assets"]
    lines = [f"corpus job: {'ok' if corpus['success'] else 'FAILED'} in {corpus['seconds']:.1f}s"
             + (f"; failed checks: {', '.join(corpus['failed_checks'])}"
                if corpus["failed_checks"] else "")]
    if "modality_statistics" in assets:
        transfer = assets["modality_statistics"]["transfer"]
        lines.append(f"Stage 3: {transfer['count']} caption embeddings ({transfer['dim']}-d, "
                     f"{transfer['model_id']}), statistics {transfer['statistics_version']}, "
                     f"|mu_text| {transfer['mu_text_norm']:.3f}"
                     + (f", {transfer['image_count']} reference images"
                        if transfer["image_count"] else ""))
    if "transferred_embeddings" in assets:
        meta = assets["transferred_embeddings"]
        lines.append(f"  transferred {meta['dagster/row_count']}: {meta['formula']}")
    for name in ("pretrain_dataset", "instruct_dataset"):
        if name in assets:
            meta = assets[name]
            lines.append(f"export {name}: {meta['dagster/row_count']} records, "
                         f"{meta['embeddings']} embeddings in {meta['embedding_files']} "
                         f"safetensors file(s) -> {meta['export_dir']}")
    notes = {m["model_note"] for m in assets.values() if "model_note" in m}
    lines.extend(f"NOTE: {note}" for note in sorted(notes))
    return "\n".join(lines)


def summarise(summary: dict, io=None, instance=None) -> str:
    """The shard runs' summary: per shard and in total, the seed lines read (lines of the seed
    file, as the seed step counted them), the seeds made from them (a label line makes one per
    template), and what each stage kept. `io` and `instance`: the profile's Parquet IO manager
    and the DAGSTER_HOME instance unless given."""
    import polars as pl

    io = io or _defs().resources["io_manager"]
    instance = instance or _instance()
    lines = []
    totals = {"lines_read": 0, "seeds": 0, "label_seeds": 0, "captions": 0, "instructions": 0,
              "embeddings": 0}
    rejected: dict[str, int] = {}
    for key, run in summary["runs"].items():
        row = dict.fromkeys(totals, 0)
        for asset, field in (("expanded_captions", "captions"), ("instructions", "instructions"),
                             ("caption_embeddings", "embeddings")):
            try:
                row[field] = pl.scan_parquet(io.uri(asset, key)).select(pl.len()).collect().item()
            except (FileNotFoundError, OSError, pl.exceptions.ComputeError):
                pass
        try:
            row["seeds"], row["label_seeds"] = pl.scan_parquet(io.uri("caption_seeds", key)).select(
                pl.len(), (pl.col("seed_kind") == "label").sum()).collect().row(0)
        except (FileNotFoundError, OSError, pl.exceptions.ComputeError):
            pass
        row["lines_read"] = _lines_read(instance, key, run["run_id"])
        try:
            rej = pl.read_parquet(io.uri("expanded_caption_rejects", key))
            for reason, n in rej.group_by("reason").len().iter_rows():
                rejected[reason] = rejected.get(reason, 0) + n
        except (FileNotFoundError, OSError, pl.exceptions.ComputeError):
            pass
        for k in totals:
            totals[k] += row[k]
        status = "ok" if run["success"] else "FAILED"
        checks = f"; failed checks: {', '.join(run['failed_checks'])}" if run["failed_checks"] else ""
        lines.append(f"  {key:<28} {status:<6} lines {row['lines_read']:>4}  seeds "
                     f"{row['seeds']:>4}  captions {row['captions']:>4}  instructions "
                     f"{row['instructions']:>4}  embeddings {row['embeddings']:>4}  "
                     f"{run['seconds']:6.1f}s{checks}")
    lines.insert(0, f"{len(summary['runs'])} shard(s):")
    lines.append(f"seed lines read: {totals['lines_read']}, seeds made: {totals['seeds']} "
                 f"({totals['label_seeds']} of them from label templates), "
                 f"captions kept: {totals['captions']}, instruction records: "
                 f"{totals['instructions']}, caption embeddings: {totals['embeddings']}")
    lines.append("captions rejected by reason: " + (", ".join(
        f"{r}={n}" for r, n in sorted(rejected.items())) or "none"))
    return "\n".join(lines)


def _lines_read(instance, key: str, run_id: str) -> int:
    """The lines of shard `key`'s seed file that run `run_id` read, from the metadata of the
    run's materialisation of caption_seeds (or of caption_seed_rejects, which a shard failed by
    the seed gates still stores); 0 when the run read no seeds."""
    import dagster as dg

    for asset in ("caption_seeds", "caption_seed_rejects"):
        records = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey(asset), asset_partitions=[key]), limit=5).records
        for record in records:
            metadata = record.asset_materialization.metadata
            if record.run_id == run_id and "lines_read" in metadata:
                return int(metadata["lines_read"].value)
    return 0


def run_all(shards: list[str] | None = None, job: str = "unicorn_shard_job",
            corpus: bool = True) -> bool:
    """The shards, then (when every shard succeeded) the corpus job; prints both summaries."""
    summary = run_shards(shards, job)
    typer.echo(summarise(summary))
    ok = all(r["success"] for r in summary["runs"].values())
    if corpus and ok:
        result = run_corpus()
        typer.echo(summarise_corpus(result))
        ok = result["success"]
    elif corpus:
        typer.secho("corpus job skipped: it spans every shard, and a shard failed",
                    fg=typer.colors.YELLOW, err=True)
    return ok


@app.command()
def materialize(shard: list[str] = typer.Option(None, help="shard key(s); default: all"),
                job: str = typer.Option("unicorn_shard_job", help="the job to run per shard"),
                corpus: bool = typer.Option(False, help="then run unicorn_corpus_job (statistics, "
                                            "transfer, exports) over every shard"),
                verbose: bool = VERBOSE) -> None:
    """Register the shards and materialise the per-shard pipeline for each (with --corpus, then
    the corpus-wide statistics, transfer and exports)."""
    OUTPUT.verbose = verbose
    started = time.perf_counter()
    ok = run_all(shard, job, corpus)
    typer.echo(f"wall time: {time.perf_counter() - started:.1f}s")
    if not ok:
        raise typer.Exit(1)


@app.command()
def demo(verbose: bool = VERBOSE) -> None:
    """Run the bundled seeds through the pipeline with the offline models, then summarise."""
    OUTPUT.verbose = verbose
    started = time.perf_counter()
    defs = _defs()
    res = defs.resources
    typer.echo(f"seeds: {res['seeds'].location}\nmodel: {res['llm'].model_id}"
               f"{'' if res['llm'].is_trained_model else ' (untrained stand-in)'}")
    clip = res["clip"]
    typer.echo(f"CLIP: {clip.model_id}" + ("" if clip.is_pretrained else
               " -- UNTRAINED (random weights): the embeddings and exports are meaningless, "
               "for a pipeline run only; set clip.pretrained for real weights"))
    ok = run_all()
    base = Path(res["io_manager"].base_uri).resolve()
    typer.echo(f"results: {base} (Parquet), catalog: {base / 'catalog.duckdb'} (query it: "
               "unicorn sql \"select shard, count(*) from expanded_captions group by 1\")")
    typer.echo(f"runs: DAGSTER_HOME={os.environ['DAGSTER_HOME']} (see them with `dagster dev`)")
    if OUTPUT.log_path:
        typer.echo(f"event log: {OUTPUT.log_path}")
    typer.echo(f"wall time: {time.perf_counter() - started:.1f}s")
    if not ok:
        raise typer.Exit(1)


def submit_backfill(keys: list[str] | None = None, start: str | None = None,
                    end: str | None = None, select: str | None = None,
                    job: str = "unicorn_shard_job") -> tuple[str, list[str], list[str]]:
    """Register the shards, then submit an asset backfill over them to the instance, exactly as
    the UI's Materialize -> backfill does: the daemon runs it, several shards per run
    (BackfillPolicy). Returns (backfill id, shard keys, asset keys)."""
    import dagster as dg

    from dagster_project.dagster_internal import submit_asset_backfill
    from unicorn_assets.partitions import SEED_SHARDS

    instance, defs = _instance(), _defs()
    registered = _register(instance, defs)
    order = list(instance.get_dynamic_partitions(SEED_SHARDS))
    if keys:
        unknown = sorted(set(keys) - set(registered))
        if unknown:
            raise typer.BadParameter(f"no seed file for shard(s) {unknown}; known: {registered}")
    else:
        for bound in (start, end):
            if bound and bound not in order:
                raise typer.BadParameter(f"--from/--to {bound!r} is not a shard; known: {order}")
        first = order.index(start) if start else 0
        last = order.index(end) if end else len(order) - 1
        keys = order[first:last + 1]
    graph = defs.resolve_asset_graph()
    assets = (dg.AssetSelection.from_string(select).resolve(graph) if select
              else defs.resolve_job_def(job).asset_layer.executable_asset_keys)
    backfill_id = submit_asset_backfill(instance, graph, sorted(assets, key=str), keys,
                                        {"unicorn/trigger": "cli_backfill"},
                                        f"unicorn backfill: {len(keys)} shard(s)")
    return backfill_id, keys, sorted(k.to_user_string() for k in assets)


@app.command()
def backfill(shard: list[str] = typer.Option(None, help="shard key(s); default: all (or a range)"),
             start: str = typer.Option(None, "--from", help="first shard of a range"),
             end: str = typer.Option(None, "--to", help="last shard of a range"),
             select: str = typer.Option(None, help="Dagster asset selection, e.g. "
                                        "'group:\"unicorn_stage1\"'; default: unicorn_shard_job's "
                                        "assets")) -> None:
    """Submit a backfill over many shards for the Dagster daemon (see it under Runs -> Backfills)."""
    backfill_id, keys, assets = submit_backfill(shard, start, end, select)
    typer.echo(f"backfill {backfill_id}: {len(keys)} shard(s) x {len(assets)} asset(s) submitted "
               f"to DAGSTER_HOME={os.environ['DAGSTER_HOME']}; the daemon runs it "
               "(`dagster-daemon run`, or `dagster dev`)")


@app.command()
def catalog() -> None:
    """Rebuild the DuckDB catalog: one view per asset over its Parquet files."""
    from unicorn_resources.storage import CatalogLocked

    io = _defs().resources["io_manager"]
    try:
        names = io.rebuild_catalog()
    except CatalogLocked as err:
        typer.secho(f"catalog not rebuilt: {err}. Close the other DuckDB session (or wait for "
                    "it), then run `unicorn catalog` again", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{io.catalog().path}: {len(names)} view(s): {', '.join(names)}")


@app.command()
def sql(query: str = typer.Argument(..., help="a DuckDB query over the catalog's views, e.g. "
                                    "\"select shard, count(*) from expanded_captions group by 1\""),
        limit: int = typer.Option(100, min=0, help="print at most this many rows (0: all)")
        ) -> None:
    """Query the DuckDB catalog (one view per asset) read-only and print the result as a table."""
    import duckdb
    from rich.console import Console
    from rich.table import Table

    catalog = _defs().resources["io_manager"].catalog()
    if not Path(catalog.path).exists():
        typer.secho(f"no catalog at {catalog.path}: materialise something first (`unicorn demo`) "
                    "or build it from the files with `unicorn catalog`", fg=typer.colors.RED,
                    err=True)
        raise typer.Exit(2)
    try:
        with catalog.connect(read_only=True) as con:
            cursor = con.execute(query)
            columns = [d[0] for d in cursor.description or []]
            rows = cursor.fetchmany(limit) if limit else cursor.fetchall()
            more = bool(limit) and cursor.fetchone() is not None
    except duckdb.Error as err:
        message = str(err).splitlines()[0]
        hint = (" (another process holds the catalog for writing: wait for it, or close it)"
                if "lock" in message.lower() else
                "; the views: unicorn sql \"select view_name from duckdb_views() where not "
                "internal\"")
        typer.secho(f"{message}{hint}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    table = Table(*columns)
    for row in rows:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    console = Console()
    console.print(table)
    console.print(f"{len(rows)} row(s)" + (f" shown (--limit {limit}); more exist" if more else ""))


cache_app = typer.Typer(no_args_is_help=True, help="The LLM response cache of the profile.")
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info() -> None:
    """Show the cache file and how many completions it holds per model."""
    llm = _defs().resources["llm"]
    typer.echo(f"{llm.cache_path} ({'enabled' if llm.cache_enabled else 'disabled'})")
    for model_id, n in llm.response_cache().counts().items():
        typer.echo(f"  {model_id}\t{n}")


@cache_app.command("clear")
def cache_clear(model: str = typer.Option(None, help="only this model id (see `cache info`)")) -> None:
    """Delete the cached completions (all, or one model's), so the next run asks the model again."""
    llm = _defs().resources["llm"]
    typer.echo(f"{llm.response_cache().clear(model)} cached completion(s) deleted from "
               f"{llm.cache_path}")


def _written(io, asset: str, key: str | None = None) -> bool:
    fs, path = io.s3.fs(io.uri(asset, key))
    return fs.exists(path)


@app.command()
def synthvlm(shard: list[str] = typer.Option(None, help="shard key(s) to render; default: all"),
             verbose: bool = VERBOSE) -> None:
    """SynthVLM branch: Stage 1 for shards that lack captions, then per shard synthvlm_job (choose
    captions, render with SDXL, score), then synthvlm_corpus_job (select, export LLaVA data)."""
    import polars as pl

    OUTPUT.verbose = verbose
    started = time.perf_counter()
    defs = _defs()
    if "synthvlm_job" not in {job.name for job in defs.resolve_all_job_defs()}:
        typer.secho("the SynthVLM branch is off in this profile: set `synthvlm: {enabled: true}` "
                    "(or UNICORN_SYNTHVLM=true with the local profile)", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    res = defs.resources
    typer.echo(f"renderer: {res['diffusion'].model_id}\nCLIP: {res['clip'].model_id}")
    io = res["io_manager"]
    keys = shard or _register(_instance(), defs)
    missing = [k for k in keys if not _written(io, "expanded_captions", k)]
    runs = run_shards(missing)["runs"] if missing else {}
    summary = run_shards(keys, "synthvlm_job")
    lines = []
    for key, run in summary["runs"].items():
        counts = {a: pl.scan_parquet(io.uri(a, key)).select(pl.len()).collect().item()
                  if _written(io, a, key) else 0
                  for a in ("synthvlm_candidates", "synthetic_images", "image_scores")}
        checks = f"; failed checks: {', '.join(run['failed_checks'])}" if run["failed_checks"] else ""
        lines.append(f"  {key:<28} {'ok' if run['success'] else 'FAILED':<6} captions "
                     f"{counts['synthvlm_candidates']:>3}  images {counts['synthetic_images']:>4}  "
                     f"scored {counts['image_scores']:>4}  {run['seconds']:6.1f}s{checks}")
    typer.echo(f"{len(lines)} shard(s):\n" + "\n".join(lines))
    ok = all(r["success"] for r in [*runs.values(), *summary["runs"].values()])
    from unicorn_assets.partitions import SEED_SHARDS

    instance = _instance()
    unscored = [k for k in instance.get_dynamic_partitions(SEED_SHARDS)
                if not _written(io, "image_scores", k)]
    if unscored:
        typer.secho(f"selection skipped: shard(s) {unscored} have no image_scores yet; the "
                    "selection spans every shard", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(1)
    try:
        corpus = execute_job(instance, defs.get_job_def("synthvlm_corpus_job"))
    finally:
        OUTPUT.close()
    _report_errors("synthvlm_corpus_job", corpus)
    ok = ok and corpus["success"]
    if _written(io, "synthvlm_selection"):
        chosen = pl.read_parquet(io.uri("synthvlm_selection"))
        typer.echo(f"selected {int(chosen['selected'].sum())} of "
                   f"{int(chosen['best_of_n'].sum())} captions ({chosen.height} images)")
    meta = _materializations(corpus["events"]).get("synthvlm_dataset")
    if meta:
        typer.echo(f"export: {meta['export_dir']} ({meta['dagster/row_count']} records, "
                   "manifest.json)")
    typer.echo(f"wall time: {time.perf_counter() - started:.1f}s")
    if not ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
