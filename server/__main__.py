"""`python -m server`: serve a model (the embedded SmolLM2 by default) over the OpenAI API.

Engine flags are vLLM's own (`--model`, `--served-model-name`, `--dtype`, `--max-model-len`,
`--enforce-eager`, and every other `vllm serve` engine flag); the server adds `--host`, `--port`,
and `--api-key`; vLLM's `--log-level` sets the server's logging too.
"""

import argparse
import logging
import os
import sys

import uvicorn

from server.app import create_app
from server.serving import EngineState

logger = logging.getLogger("server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from samplers.vllm_engine import VllmModel

    parser = argparse.ArgumentParser(
        prog="python -m server", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    parser.add_argument("--api-key", default=os.environ.get("POWERSERVE_API_KEY"),
                        help="Require 'Authorization: Bearer KEY' on /v1/* (env POWERSERVE_API_KEY).")
    VllmModel.add_cli_args(parser)
    parser.set_defaults(model=None)
    return parser.parse_args(argv)


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

    state = EngineState(served_name=served_name, root=args.model)
    failed = []

    def on_fatal() -> None:
        failed.append(True)
        server.should_exit = True

    app = create_app(state, lambda: VllmModel.create(args), api_key=args.api_key, on_fatal=on_fatal)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=log_level.lower(),
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
