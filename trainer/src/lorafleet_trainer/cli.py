"""The ``lorafleet-trainer`` command: ``serve`` runs one trainer pod's HTTP service under uvicorn.

Flags mirror :class:`~lorafleet_trainer.settings.TrainerSettings` one to one; each may instead
come from its ``LORAFLEET_TRAINER_*`` variable. Bad settings exit with status 2 before the model
loads. SIGTERM (what Kubernetes sends) stops new work, lets the running step finish, then exits.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import uvicorn

from lorafleet_trainer import hostalloc, threads
from lorafleet_trainer import settings as settings_mod
from lorafleet_trainer.errors import TrainerError
from lorafleet_trainer.http.auth import read_token
from lorafleet_trainer.service.serving import TrainerService


class _Server(uvicorn.Server):
    """uvicorn, plus: on SIGTERM/SIGINT the step queue closes before connections drain."""

    def __init__(self, config: uvicorn.Config, service: TrainerService) -> None:
        super().__init__(config)
        self._service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._service.begin_shutdown_threadsafe()
        super().handle_exit(sig, frame)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet-trainer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the trainer HTTP service",
        description="Every flag can also be set as LORAFLEET_TRAINER_<FLAG> "
        "(e.g. LORAFLEET_TRAINER_MAX_QUEUE).",
    )
    for name, field in settings_mod.TrainerSettings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        help_text = f"{field.description or name} (env {settings_mod.env_name(name)}; default {default})"
        # SUPPRESS: flags not given stay absent, so the environment and the defaults apply.
        serve.add_argument(settings_mod.flag_name(name), dest=name, default=argparse.SUPPRESS, help=help_text)
    model_dir = commands.add_parser(
        "model-dir",
        help="print the local directory of a model id (a builtin is generated or converted first)",
        description="What an inference server beside the trainers loads: the same model, as a "
        "Hugging Face directory (e.g. vLLM's --model for builtin:smollm2).",
    )
    model_dir.add_argument("model", help="builtin:tiny, builtin:smollm2, a hub id or a local path")
    model_dir.add_argument("--model-cache-dir", type=Path, default=None, help="default: HF_HOME's")
    return parser


def _model_dir(model: str, cache_dir: Path | None) -> int:
    from lorafleet_trainer.errors import InvalidInput
    from lorafleet_trainer.models import models  # the model stack, only for this command

    try:
        print(models.resolve(model, cache_dir))
    except InvalidInput as exc:
        print(f"lorafleet-trainer: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    if args.pop("command") == "model-dir":
        return _model_dir(args["model"], args["model_cache_dir"])
    try:
        config = settings_mod.load(args)
    except settings_mod.SettingsError as exc:
        print(f"lorafleet-trainer: invalid setting: {exc}", file=sys.stderr)
        return 2
    token = None
    if config.auth_token_file is not None:
        source = (
            "--auth-token-file" if "auth_token_file" in args else settings_mod.env_name("auth_token_file")
        )
        try:
            token = read_token(config.auth_token_file)
        except ValueError as exc:
            print(f"lorafleet-trainer: invalid setting: {source}: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    # Before the model loads: torch sizes its thread pool once, on first use.
    chosen = threads.plan(config.threads, config.cpu_request_millicores)
    threads.apply(chosen)
    hostalloc.tune()

    from lorafleet_trainer.app import create_app  # after validation: it imports the model stack

    try:
        app = create_app(config, token=token)
    except TrainerError as exc:  # e.g. --device cuda on a machine without CUDA
        source = (
            settings_mod.flag_name(exc.field) if exc.field in args else settings_mod.env_name(exc.field or "")
        )
        print(f"lorafleet-trainer: invalid setting: {source}: {exc.message}", file=sys.stderr)
        return 2
    threads.export(app.state.service.metrics.registry, chosen)
    server = _Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            timeout_graceful_shutdown=int(config.shutdown_timeout),
            lifespan="on",
        ),
        app.state.service,
    )
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
