"""The `tollway` command: assembles each package's slice and adds init, serve, keys, tokens.

Thin by design: every command parses its flags, calls into the core, and prints. With `--json`
a command prints one JSON document on stdout; messages go to stderr. Exit codes: 0 success,
1 a check failed or the input was refused, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import sys
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from policy.files import RouteRule, load_policy_files
from proxy import durations
from proxy.control import ControlError, ControlStore, ControlUnavailable, is_postgres, utcnow
from proxy.crypto import Keyring, SecretError, load_master_key, write_master_key
from proxy.errors import StartupError
from proxy.settings import BUILTIN_PROVIDERS, SettingsError, load_settings, resolve_data_dir

SAMPLES = Path(__file__).resolve().parent.parent / "data"
SAMPLE_FILES = ("tollway.toml", "tenants.csv", "pricing.csv", "policy/model.conf", "policy/access.csv",
                "policy/routes.csv", "policy/limits.csv", "policy/operations.csv", "policy/identities.csv")
#: Commands that run without a deployment directory: they create one, or need none.
NO_DEPLOYMENT_NEEDED = ("init", "demo", "simulator", "token", "status")
SIMULATOR_PORT = 9090
SIMULATOR_URL = f"http://127.0.0.1:{SIMULATOR_PORT}"


class CommandError(Exception):
    """Refused input: printed as `error: ...` with exit code 1."""


def say(message: str) -> None:
    print(message, file=sys.stderr)


def emit(args: argparse.Namespace, document: object, human: str | None) -> None:
    """`--json`: the document on stdout; otherwise the human text (None: nothing on stdout)."""
    if getattr(args, "json", False):
        print(json.dumps(document, indent=2, default=str))
    elif human is not None:
        print(human)


def require_deployment(data_dir: Path) -> Path:
    """`data_dir` if it holds a deployment (any file `tollway init` writes); else why not, and the next step."""
    if not data_dir.is_dir():
        raise CommandError(f"no deployment at {data_dir} (no such directory): run `tollway init {data_dir}` first")
    if not any((data_dir / name).exists() for name in ("control.db", *SAMPLE_FILES)):
        raise CommandError(f"no deployment at {data_dir}: run `tollway init {data_dir}` first")
    return data_dir


def open_store(args: argparse.Namespace) -> ControlStore:
    """The deployment's control store ([control] url: control.db, or PostgreSQL), with its master key."""
    data_dir = require_deployment(resolve_data_dir(args.data_dir))
    target = load_settings(data_dir).control_target
    if not is_postgres(target) and not target.exists():
        raise CommandError(f"no control.db in {data_dir}: run `tollway init {data_dir}` first")
    return ControlStore(target, Keyring(load_master_key(data_dir)))


# --- init ---------------------------------------------------------------------------------------
def init_deployment(target: Path, simulator_url: str | None = None) -> tuple[list[str], Path]:
    """Copy the samples (keeping existing files), create the master key and `control.db`.

    With `simulator_url`, the `tollway.toml` written points every built-in provider at that simulator.
    """
    (target / "policy").mkdir(parents=True, exist_ok=True)
    written = []
    for name in SAMPLE_FILES:
        dest = target / name
        if not dest.exists():
            if name == "tollway.toml" and simulator_url:
                dest.write_text(simulated_toml((SAMPLES / name).read_text(), simulator_url))
            else:
                shutil.copyfile(SAMPLES / name, dest)
            written.append(name)
    key_file = write_master_key(target)
    ControlStore(load_settings(target).control_target, Keyring(load_master_key(target))).close()
    return written, key_file


def simulator_base_urls(simulator_url: str) -> dict[str, str]:
    """Each built-in provider's base_url on the simulated provider at `simulator_url`."""
    return {name: f"{simulator_url.rstrip('/')}/{name}" for name in BUILTIN_PROVIDERS}


def simulated_toml(sample: str, simulator_url: str) -> str:
    """The sample tollway.toml with every built-in provider's base_url on the simulator (comments kept)."""
    for name, url in simulator_base_urls(simulator_url).items():
        real = f'base_url = "{BUILTIN_PROVIDERS[name]["base_url"]}"'
        if real not in sample:
            raise CommandError(f"the sample tollway.toml has no line {real}: cannot point {name} at the simulator")
        sample = sample.replace(real, f'base_url = "{url}"  # `tollway simulator`; for real calls: '
                                      f'{BUILTIN_PROVIDERS[name]["base_url"]}', 1)
    return sample


def _simulator_url(text: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+/?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: give the simulator's URL, e.g. {SIMULATOR_URL}")
    return text.rstrip("/")


def cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.dir or args.data_dir or "./data").expanduser().resolve()
    simulator_url = (args.simulator_url or SIMULATOR_URL) if args.simulated or args.simulator_url else None
    written, key_file = init_deployment(target, simulator_url)
    say(f"deployment ready in {target} ({len(written)} sample files written, existing files kept)")
    if simulator_url and "tollway.toml" not in written:
        say(f"warning: {target / 'tollway.toml'} already existed and was kept: point its [providers.*] base_url "
            f"at {simulator_url}/openai, /anthropic and /gemini yourself, or delete it and run this again")
    elif simulator_url:
        port = urlsplit(simulator_url).port or SIMULATOR_PORT
        say(f"providers point at the simulated provider on {simulator_url}: start it with `tollway simulator"
            f"{'' if port == SIMULATOR_PORT else f' --port {port}'}` (it accepts any provider key)")
    say(next_step(target))
    emit(args, {"data_dir": str(target), "written": written, "master_key_file": str(key_file),
                "simulator_url": simulator_url}, str(target))
    return 0


def next_step(target: Path) -> str:
    """What to do after `init`: add the keys that routes.csv names (the gateway starts once they exist)."""
    from policy.loader import keys_add_command

    first_route: dict[str, RouteRule] = {}
    for route in load_policy_files(target).routes:
        for key_id in route.key_ids:
            first_route.setdefault(key_id, route)
    commands = "".join(f"\n  echo \"$KEY\" | {keys_add_command(route, key_id, f'tollway --data-dir {target}')}"
                       for key_id, route in first_route.items())
    return ("next: add the keys policy/routes.csv names (the gateway starts once they exist; the key on stdin):"
            + commands if commands else
            "next: add a route to policy/routes.csv, and its key with `tollway keys add` (the key on stdin)")


# --- simulator ----------------------------------------------------------------------------------
def cmd_simulator(args: argparse.Namespace) -> int:
    from proxy.server import bind_socket
    from proxy.simulator import serve

    keys = dict(args.key or [])
    sock = bind_socket(args.host, args.port)
    with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C before the simulator's own handlers are in place
        asyncio.run(serve(args.host, args.port, keys, record=False, lifelike=args.lifelike, sock=sock,
                          on_ready=lambda url: announce_simulator(url, keys)))
    say("simulator stopped")
    return 0


def announce_simulator(url: str, keys: dict[str, str]) -> None:
    """Where the simulator listens, the keys it accepts, and its `tollway.toml` lines (those on stdout)."""
    accepted = ", ".join(f"{family} only {key!r}" for family, key in keys.items()) or "any key"
    say(f"simulated OpenAI, Anthropic and Gemini on {url} (no network; provider keys accepted: {accepted})")
    say(f"for a new deployment: `tollway init DIR --simulated{'' if url == SIMULATOR_URL else ' --simulator-url ' + url}`"
        "; for an existing one, these lines in its tollway.toml:")
    print("".join(f'[providers.{name}]\nbase_url = "{base}"\n' for name, base in simulator_base_urls(url).items()),
          end="", flush=True)
    say("Ctrl-C stops it.")


def port_number(text: str) -> int:
    """A TCP port for --port: 1 to 65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: use a number from 1 to 65535")
    return int(text)


def _simulator_key(text: str) -> tuple[str, str]:
    from proxy.simulator import _parse_key

    return _parse_key(text)


# --- keys ---------------------------------------------------------------------------------------
def _key_json(key) -> dict:
    return {"id": key.key_id, "provider": key.provider, "owner": key.owner, "fingerprint": key.fingerprint,
            "status": key.status, "health": key.health, "created_at": key.created_at, "updated_at": key.updated_at}


def _read_secret() -> str:
    if sys.stdin.isatty():
        say("paste the provider key, then press Enter:")
    secret = sys.stdin.readline().strip()
    if not secret:
        raise CommandError("no key on stdin: pipe it in, e.g. `echo \"$OPENAI_API_KEY\" | tollway keys add ...`")
    return secret


def cmd_keys_add(args: argparse.Namespace) -> int:
    data_dir = resolve_data_dir(args.data_dir)
    settings = load_settings(data_dir)
    if args.provider not in settings.providers:
        raise CommandError(f"unknown provider {args.provider!r}; known: {', '.join(sorted(settings.providers))} "
                           "(declare others in tollway.toml [providers.NAME])")
    store = open_store(args)
    key = store.add_key(args.key_id, args.provider, _read_secret(), None if args.operator else args.tenant)
    say(f"stored key {key.key_id} ({key.provider}, owner {key.owner}, fingerprint {key.fingerprint})")
    emit(args, _key_json(key), key.key_id)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    keys = open_store(args).list_keys()
    lines = [f"{'ID':24} {'PROVIDER':12} {'OWNER':16} {'FINGERPRINT':12} STATUS"] + [
        f"{k.key_id:24} {k.provider:12} {k.owner:16} {k.fingerprint:12} {k.status}"
        + (f" ({k.health}; `tollway keys rotate {k.key_id}` clears it)" if k.health != "ok" else "") for k in keys]
    emit(args, [_key_json(k) for k in keys], "\n".join(lines))
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    key = open_store(args).rotate_key(args.key_id, _read_secret())
    say(f"rotated key {key.key_id} (fingerprint now {key.fingerprint}); the gateway uses it from the next request")
    emit(args, _key_json(key), key.key_id)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    key = open_store(args).revoke_key(args.key_id)
    say(f"revoked key {key.key_id}; routes naming it fall through to the next key of their pool")
    emit(args, _key_json(key), key.key_id)
    return 0


# --- tokens -------------------------------------------------------------------------------------
def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `2w`, `45s`."""
    duration = durations.parse_duration(text)
    if duration is None:
        raise CommandError(f"--expires-in {text!r}: use a number and a unit, e.g. 30d, 12h, 90m, 2w")
    return duration


def cmd_tokens_create(args: argparse.Namespace) -> int:
    expires = utcnow() + parse_duration(args.expires_in) if args.expires_in else None
    token, secret = open_store(args).create_token(args.tenant, args.user, args.role or [], expires)
    say(f"token {token.token_id} for {token.user_id} in {token.tenant}; it is shown only this once")
    if args.tenant not in load_policy_files(resolve_data_dir(args.data_dir)).tenants:
        say(f"warning: tenant {args.tenant!r} is not in tenants.csv: the gateway refuses this token "
            "(403 unknown_tenant) until it is added there")
    emit(args, {**token.as_json(), "token": secret}, secret)
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    tokens = open_store(args).list_tokens()
    lines = [f"{'ID':18} {'TENANT':14} {'USER':28} {'ROLES':24} {'EXPIRES':21} STATUS"] + [
        f"{t.token_id:18} {t.tenant:14} {t.user_id:28} {','.join(t.roles):24} {t.expires_at or '-':21} "
        f"{'revoked' if t.revoked_at else 'active'}" for t in tokens]
    emit(args, [t.as_json() for t in tokens], "\n".join(lines))
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    token = open_store(args).revoke_token(args.token_id)
    say(f"revoked token {token.token_id}; it is refused from the next request on")
    emit(args, token.as_json(), token.token_id)
    return 0


# --- assembly -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from analytics.cli import register as register_credits
    from dashboard.cli import register as register_dashboard
    from policy.cli import register as register_policy
    from proxy.audit import register as register_audit
    from proxy.control.cli import register as register_control
    from proxy.demo_cli import register as register_demo
    from proxy.pipeline.cli import register as register_pipeline
    from proxy.pricing_cli import register as register_pricing
    from proxy.serve_cli import register as register_serve
    from proxy.status_cli import register as register_status
    from proxy.token_cli import register as register_token

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=argparse.SUPPRESS,
                        help="deployment directory (default: $TOLLWAY_DATA_DIR or ./data)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print one JSON document on stdout")

    parser = argparse.ArgumentParser(prog="tollway", parents=[common],
                                     description="Tollway: a self-hosted BYOK LLM gateway with governance and metering.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser("init", parents=[common, as_json], help="create a deployment directory with samples")
    init.add_argument("dir", nargs="?", help="directory to create (default: --data-dir or ./data)")
    init.add_argument("--simulated", action="store_true",
                      help="point every built-in provider at the simulated provider (`tollway simulator`)")
    init.add_argument("--simulator-url", type=_simulator_url,
                      help=f"the simulator's URL (implies --simulated; default {SIMULATOR_URL})")
    init.set_defaults(func=cmd_init)

    register_serve(commands, common)

    simulator = commands.add_parser("simulator", parents=[common],
                                    help="run the simulated provider (OpenAI, Anthropic, Gemini) for offline trials",
                                    description="Simulated OpenAI, Anthropic and Gemini APIs on one port, under "
                                                "/openai, /anthropic and /gemini: no network, no provider account.")
    simulator.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    simulator.add_argument("--port", type=port_number, default=SIMULATOR_PORT, help=f"port (default {SIMULATOR_PORT})")
    simulator.add_argument("--key", action="append", type=_simulator_key, metavar="FAMILY=KEY",
                           help="accept only KEY for FAMILY (openai, anthropic or gemini; repeatable); "
                                "default: any key")
    simulator.add_argument("--lifelike", action="store_true",
                           help="real-world latency and reply lengths, and an occasional 429 or 503")
    simulator.set_defaults(func=cmd_simulator)

    keys = commands.add_parser("keys", parents=[common], help="provider keys: add, list, rotate, revoke")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = key_commands.add_parser("add", parents=[common, as_json], help="store a provider key read from stdin")
    add.add_argument("key_id")
    add.add_argument("--provider", required=True, help="provider name, e.g. openai, anthropic, gemini")
    owner = add.add_mutually_exclusive_group(required=True)
    owner.add_argument("--tenant", help="the tenant that owns the key (BYOK: the provider bills the tenant)")
    owner.add_argument("--operator", action="store_true", help="the operator owns the key (unified billing)")
    add.set_defaults(func=cmd_keys_add)
    key_commands.add_parser("list", parents=[common, as_json], help="list keys (id and fingerprint only)"
                            ).set_defaults(func=cmd_keys_list)
    rotate = key_commands.add_parser("rotate", parents=[common, as_json], help="replace a key's secret (stdin)")
    rotate.add_argument("key_id")
    rotate.set_defaults(func=cmd_keys_rotate)
    revoke = key_commands.add_parser("revoke", parents=[common, as_json], help="stop using a key")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_keys_revoke)

    tokens = commands.add_parser("tokens", parents=[common], help="client tokens: create, list, revoke")
    token_commands = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    create = token_commands.add_parser("create", parents=[common, as_json], help="issue a client token (tw_...)")
    create.add_argument("--tenant", required=True, help="the tenant the token's requests count against")
    create.add_argument("--user", required=True, help="user id or email (stored only in control.db)")
    create.add_argument("--role", action="append", help="a role the token carries (repeatable)")
    create.add_argument("--expires-in", help="lifetime, e.g. 30d, 12h, 2w (default: no expiry)")
    create.set_defaults(func=cmd_tokens_create)
    token_commands.add_parser("list", parents=[common, as_json], help="list tokens (never their secrets)"
                              ).set_defaults(func=cmd_tokens_list)
    revoke_token = token_commands.add_parser("revoke", parents=[common, as_json], help="revoke a token by id")
    revoke_token.add_argument("token_id")
    revoke_token.set_defaults(func=cmd_tokens_revoke)

    register_token(commands, common)
    register_status(commands, common, as_json)
    register_policy(commands, common, as_json)
    register_credits(commands, common, as_json)
    register_pricing(commands, common, as_json)
    register_audit(commands, common, as_json)
    register_control(commands, common, as_json)
    register_dashboard(commands, common)
    register_demo(commands, common)
    register_pipeline(commands, common, as_json)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "data_dir"):
        args.data_dir = None
    try:
        if args.command not in NO_DEPLOYMENT_NEEDED:
            require_deployment(resolve_data_dir(args.data_dir))
        return args.func(args)
    except (CommandError, ControlError, ControlUnavailable, SecretError, SettingsError, StartupError) as exc:
        say(f"error: {exc}")
        return 1


if __name__ == "__main__":
    # `python -m proxy.cli` runs this file as __main__; the subcommand modules import `proxy.cli`, so
    # hand over to that module: one CommandError class, caught by the `main` that raised it.
    from proxy.cli import main as cli_main

    sys.exit(cli_main())
