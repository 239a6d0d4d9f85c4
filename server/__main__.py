"""`python -m server`: serve a model (the embedded SmolLM2 by default) over the OpenAI API.

Engine flags are vLLM's own (`--model`, `--served-model-name`, `--dtype`, `--max-model-len`,
`--enforce-eager`, and every other `vllm serve` engine flag); the server adds `--host`, `--port`,
`--api-key` and the admission limits; vLLM's `--log-level` sets the server's logging too.

Every flag may also come from an environment variable: POWERSERVE_ and the flag's name in capitals
with '_' for '-' (POWERSERVE_MAX_MODEL_LEN=2048 is --max-model-len 2048). A switch takes 1, true,
yes or on (0, false, no or off: its --no- form, where it has one); a repeatable flag or one of
several values takes them separated by spaces (POWERSERVE_MAX_CONCURRENT="power_mcmc=8
power_smc=2"). A flag given on the command line overrides its variable.
"""

import argparse
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import uvicorn

from samplers import REGISTRY as SAMPLERS
from server.adapters import adapter_rank, check_fits
from server.admission import QUEUE_FACTOR, Limits, parse_per_sampler
from server.app import create_app
from server.state import EngineState

logger = logging.getLogger("server")

ENV_PREFIX = "POWERSERVE_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    from samplers.vllm_engine import VllmModel

    parser = argparse.ArgumentParser(
        prog="python -m server", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    parser.add_argument("--api-key", help="Require 'Authorization: Bearer KEY' on /v1/* (best set as "
                        "POWERSERVE_API_KEY, which process listings do not show).")
    parser.add_argument("--distilled", action="append", metavar="NAME=PATH", default=[],
                        help="Also serve, as model NAME, the model with the PEFT LoRA adapter in "
                        "directory PATH (repeatable); it decodes directly.")
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="Let requests bring their own chat template (chat_template), as vLLM's flag does: "
                        "a template is code that runs on the server.")
    defaults = Limits()
    limits = parser.add_argument_group("admission limits")
    concurrency = ", ".join(f"{name} {s.default_max_concurrent}" for name, s in sorted(SAMPLERS.items()))
    limits.add_argument("--max-concurrent", action="append", metavar="SAMPLER=N",
                        help=f"Requests of SAMPLER that run at once (repeatable; default {concurrency}).")
    limits.add_argument("--max-queued", action="append", metavar="SAMPLER=N",
                        help="Requests of SAMPLER that may wait for a slot; beyond them, 429 "
                        f"(repeatable; default {QUEUE_FACTOR}x its --max-concurrent).")
    limits.add_argument("--max-request-cost", type=int, default=defaults.max_request_cost, metavar="TOKENS",
                        help="Refuse (400) requests whose sampler could spend more engine tokens "
                        f"(default {defaults.max_request_cost}).")
    limits.add_argument("--request-timeout", type=float, metavar="S",
                        help="Seconds a request may take, queueing included, unless it sets "
                        f"request_timeout; past it, 504 (default {defaults.request_timeout:g}, or "
                        "--max-request-timeout if lower).")
    limits.add_argument("--max-request-timeout", type=float, default=defaults.max_request_timeout,
                        metavar="S", help="The most a request's request_timeout may be "
                        f"(default {defaults.max_request_timeout:g}).")
    parser.add_argument("--drain-timeout", type=float, metavar="S",
                        help="On SIGTERM, the most seconds to let requests in flight finish before the rest are "
                        "aborted (default: --max-request-timeout, by when every request has met its deadline).")
    VllmModel.add_cli_args(parser)
    parser.set_defaults(model=None)
    argv = sys.argv[1:] if argv is None else argv
    try:
        from_environment = environment_arguments(parser, os.environ if environ is None else environ, argv)
    except ValueError as exc:
        parser.error(str(exc))
    args = parser.parse_args(from_environment + argv)
    if args.max_request_timeout <= 0:
        parser.error("--max-request-timeout must be positive.")
    if args.request_timeout is None:
        args.request_timeout = min(Limits.request_timeout, args.max_request_timeout)
    if not 0 < args.request_timeout <= args.max_request_timeout:
        parser.error("--request-timeout must be positive and at most --max-request-timeout.")
    if args.max_request_cost < 1:
        parser.error("--max-request-cost must be at least 1.")
    if args.drain_timeout is None:
        args.drain_timeout = args.max_request_timeout
    if args.drain_timeout < 0:
        parser.error("--drain-timeout must not be negative.")
    args.adapters, args.adapter_rank = {}, 0
    for value in args.distilled:
        name, _, path = value.partition("=")
        if not name or ":" in name or not path or name in args.adapters:
            parser.error(f"--distilled takes NAME=PATH with a new NAME without ':'; got '{value}'.")
        try:
            args.adapter_rank = max(args.adapter_rank, adapter_rank(Path(path)))
        except ValueError as exc:
            parser.error(f"--distilled: {exc}")
        args.adapters[name] = path
    return args


def environment_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str], argv: list[str]) -> list[str]:
    """The command-line arguments that environ's POWERSERVE_* variables stand for (the module
    docstring says how), leaving out the flags that argv gives; ValueError for a variable that
    names no flag or a switch's value that is neither true nor false."""
    given = {arg.partition("=")[0] for arg in argv if arg.startswith("--")}
    arguments = []
    for variable, value in sorted(environ.items()):
        if not variable.startswith(ENV_PREFIX):
            continue
        flag = "--" + variable.removeprefix(ENV_PREFIX).lower().replace("_", "-")
        action = parser._option_string_actions.get(flag)
        if action is None or flag in ("--help", "--version"):
            raise ValueError(f"the environment variable {variable} names no flag ({flag})")
        if given & set(action.option_strings):
            continue
        if action.nargs == 0:
            switch = value.strip().lower()
            if switch not in TRUE + FALSE:
                raise ValueError(f"{variable}={value!r}: {flag} is a switch, so its value must be one of "
                                 f"{', '.join(TRUE + FALSE)}")
            off = "--no-" + flag.removeprefix("--")
            arguments += [flag] if switch in TRUE else [off] if off in action.option_strings else []
        elif isinstance(action, argparse._AppendAction):
            arguments += [part for item in _words(variable, value) for part in (flag, item)]
        elif action.nargs in ("+", "*") or isinstance(action.nargs, int):
            arguments += [flag, *_words(variable, value)]
        else:
            arguments.append(f"{flag}={value}")
    return arguments


def _words(variable: str, value: str) -> list[str]:
    try:
        return shlex.split(value)
    except ValueError as exc:  # an unclosed quote
        raise ValueError(f"{variable}={value!r}: {exc}") from None


def admission_limits(args: argparse.Namespace) -> Limits:
    return Limits(
        max_concurrent=parse_per_sampler(args.max_concurrent, "--max-concurrent", SAMPLERS, minimum=1),
        max_queued=parse_per_sampler(args.max_queued, "--max-queued", SAMPLERS, minimum=0),
        max_request_cost=args.max_request_cost,
        request_timeout=args.request_timeout,
        max_request_timeout=args.max_request_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log_level = getattr(args, "log_level", None) or "info"
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from samplers.vllm_engine import VllmModel

    if args.model is None:
        from server import embedded_model

        args.model = str(embedded_model.prepare())
        args.served_model_name = args.served_model_name or [embedded_model.MODEL_NAME]
    served_name = args.served_model_name[0] if args.served_model_name else args.model
    args.served_model_name = [served_name]
    if served_name in args.adapters:
        raise SystemExit(f"--distilled: '{served_name}' is already the base model's name.")
    for path in args.adapters.values():
        if not Path(args.model).is_dir():
            logger.warning("Cannot check the adapter %s against a model from the hub; vLLM serves one "
                           "that does not fit as if it were absent.", path)
            continue
        try:
            check_fits(Path(args.model), Path(path))
        except ValueError as exc:
            raise SystemExit(f"--distilled: {exc}") from None

    state = EngineState(served_name=served_name, root=args.model, limits=admission_limits(args),
                        adapters=args.adapters, trust_request_chat_template=args.trust_request_chat_template)
    failed = []

    def on_fatal() -> None:
        failed.append(True)
        server.should_exit = True

    app = create_app(state, lambda: VllmModel.from_args(**VllmModel.engine_flags(args), adapters=args.adapters,
                                                        adapter_rank=args.adapter_rank),
                     api_key=args.api_key, on_fatal=on_fatal)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=log_level.lower(),
                            timeout_graceful_shutdown=5)
    server = DrainingServer(config, state, args.drain_timeout)
    server.run()
    return 1 if failed else 0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on a first SIGTERM drains instead of stopping at once: /health and
    new requests answer 503 while the requests in flight finish, for up to `drain_timeout` seconds;
    then it stops as uvicorn does (aborting what is left) and the process exits 0. A second SIGTERM,
    or SIGINT, stops it at once, as uvicorn would."""

    def __init__(self, config: uvicorn.Config, state: EngineState, drain_timeout: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self.drain_deadline = None

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM or self.state.draining:
            return super().handle_exit(sig, frame)
        # Not passed to uvicorn, which would raise the signal again once stopped and so exit by it.
        self.state.draining = True
        self.drain_deadline = time.monotonic() + self.drain_timeout
        logger.info("SIGTERM: draining %d request(s) in flight for at most %g s; new requests get 503",
                    self.state.in_flight, self.drain_timeout)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            if self.state.in_flight == 0:
                logger.info("Drained: every request in flight has finished; stopping")
                self.should_exit = True
            elif time.monotonic() >= self.drain_deadline:
                logger.warning("The drain timeout has passed: aborting %d request(s) in flight and stopping",
                               self.state.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


if __name__ == "__main__":
    sys.exit(main())
