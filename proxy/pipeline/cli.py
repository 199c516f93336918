"""`tollway pipeline` (long-running), `tollway pipeline run --once`, `tollway pipeline seal-spool DIR`;
`report_now` for `tollway report run`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from proxy.settings import Settings, load_settings, resolve_data_dir

SINK_HINT = ('set [events] sink = "segments" in tollway.toml (then every gateway process seals segments and '
             "the pipeline ingests them)")


def cmd_pipeline(args: argparse.Namespace) -> int:
    from proxy.cli import CommandError, emit, say
    from proxy.pipeline.runner import Pipeline, PipelineLock
    from proxy.server import configure_logging

    settings = load_settings(resolve_data_dir(args.data_dir))
    if settings.events.sink != "segments":
        raise CommandError('[events] sink is "duckdb": the gateway writes events.duckdb and runs the reports '
                           f"itself, there is nothing to ingest; to run a pipeline, {SINK_HINT}")
    lock = PipelineLock(settings.data_dir)
    if not lock.acquire():
        raise CommandError(f"a pipeline already runs on {settings.data_dir} ({lock.holder()}, {lock.path}); "
                           "it ingests continuously: `tollway report run` asks it to build the reports now")
    configure_logging()
    pipeline = Pipeline(settings, batch=args.batch)
    try:
        if not getattr(args, "once", False):
            asyncio.run(pipeline.serve(args.interval))
            return 0
        result = pipeline.ingest_once()
        manifest = pipeline.build_reports()
    finally:
        lock.release()
    say(f"ingested {result.segments} segment(s) from {pipeline.store.location}: {result.events} events, "
        f"{result.inserted} new, {result.duplicates} already present, {result.rejected} unreadable set aside; "
        f"reports built from {manifest['source_rows']} events into {settings.reports_dir}")
    emit(args, {"ingest": result.as_json(), "manifest": manifest}, None)
    return 0


def cmd_seal_spool(args: argparse.Namespace) -> int:
    from proxy.cli import CommandError, emit, say
    from proxy.pipeline.rescue import seal_copied_spool, spool_files

    settings = load_settings(resolve_data_dir(args.data_dir))
    if settings.events.sink != "segments":
        raise CommandError('[events] sink is "duckdb": gateways of this deployment keep no spool and seal no '
                           f"segments; to seal a spool here, {SINK_HINT}")
    directory: Path = args.directory
    where = "the directory the lost machine's spool files (its DATA_DIR/spool/*.spool) were copied to"
    if not directory.is_dir():
        raise CommandError(f"{directory} is not a directory: give {where}")
    if not spool_files(directory):
        raise CommandError(f"no spool files (*.spool) in {directory}: give {where}")
    rescue = seal_copied_spool(settings, directory)
    say(f"sealed {rescue.events} events from {rescue.files} spool file(s) into {rescue.segments} segment(s) in "
        f"{rescue.location}; the pipeline ingests them (an event it already holds is skipped)")
    if rescue.left:
        say(f"left in {directory}: {', '.join(rescue.left)} (held by a running gateway, not readable by this "
            "version, or not sealed)")
    emit(args, {"files": rescue.files, "events": rescue.events, "segments": rescue.segments,
                "location": rescue.location, "left": list(rescue.left), "error": rescue.error}, None)
    if rescue.error is not None:
        raise CommandError(f"the events could not be sealed in {rescue.location}: {rescue.error}; the spool files "
                           "are kept: fix the segment store (credentials, reachability) and run this again")
    return 0


def report_now(settings: Settings, wait_s: float = 120) -> tuple[dict, str]:
    """`tollway report run` with sink = "segments": the running pipeline builds (asked through the
    trigger file, it ingests first); without one, ingest and build here. Returns (manifest, who)."""
    from analytics.jobs import ask_running
    from proxy.pipeline.runner import Pipeline, PipelineLock

    lock = PipelineLock(settings.data_dir)
    if not lock.acquire():
        return ask_running(settings.reports_dir, wait_s), "pipeline"
    try:
        return Pipeline(settings).build_direct(), "direct"
    finally:
        lock.release()


def register(commands, common: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    help_text = "ingest sealed event segments into events.duckdb, run the reports and retention (sink = segments)"
    pipeline = commands.add_parser("pipeline", parents=[common], help=help_text, description=help_text + "; "
                                   "long-running until SIGTERM, or once with `tollway pipeline run --once`")
    _tuning(pipeline)
    pipeline.set_defaults(func=cmd_pipeline)
    actions = pipeline.add_subparsers(dest="pipeline_command", metavar="ACTION")
    run = actions.add_parser("run", parents=[common, as_json], help="run the pipeline (--once: one pass, then exit)")
    run.add_argument("--once", action="store_true", help="ingest what is waiting, build the reports, apply "
                     "retention, exit")
    _tuning(run)
    run.set_defaults(func=cmd_pipeline)
    seal = actions.add_parser("seal-spool", parents=[common, as_json],
                              help="seal the spool files of a lost machine, copied to DIRECTORY, into this "
                                   "deployment's segments")
    seal.add_argument("directory", type=Path, metavar="DIRECTORY",
                      help="where the lost machine's DATA_DIR/spool/*.spool files were copied")
    seal.set_defaults(func=cmd_seal_spool)


def _tuning(parser: argparse.ArgumentParser) -> None:
    from proxy.pipeline.ingest import BATCH_SEGMENTS

    parser.add_argument("--interval", type=float, default=1.0, help="seconds between ingests (default 1)")
    parser.add_argument("--batch", type=int, default=BATCH_SEGMENTS,
                        help=f"segments ingested per transaction (default {BATCH_SEGMENTS})")
