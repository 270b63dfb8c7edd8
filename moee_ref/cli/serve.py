"""`moee serve`: the options, and the start of the server (moee_ref.serve) on the loaded model.

cli.build_parser registers it with add_serve_command(commands, add_model, add_memory).
"""

from __future__ import annotations

import argparse
import os

from .common import UsageError, load_embedder, positive_int

API_KEY_ENV = "MOEE_API_KEY"


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def port_number(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535 (0: any free port), got {text!r}")
    return int(text)


def byte_size(text: str) -> int:
    from ..loading.memory import parse_bytes

    try:
        return parse_bytes(text, "--max-body")
    except Exception as exc:  # noqa: BLE001 (argparse reports it in one line)
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_serve_command(commands, add_model, add_memory) -> None:
    from ..embedding.kinds import KINDS

    p = commands.add_parser("serve", help="an OpenAI-compatible embeddings server (HS, RW, MoEE) with routing (needs the serve extra)")
    add_model(p)
    add_memory(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; another than loopback needs --api-key)")
    p.add_argument("--port", type=port_number, default=8080, help="port (default %(default)s; 0: any free port, shown in the ready line)")
    p.add_argument("--served-model-name", default=None, metavar="NAME", help="the name clients send as 'model' (default: --model as given)")
    p.add_argument("--api-key", default=None, metavar="KEY", help=f"clients must send 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)")
    p.add_argument("--allow-unauthenticated", action="store_true", help="listen on a non-loopback address without a key")
    p.add_argument("--kind", choices=list(KINDS), default="moee-sum", help="the kind of a request that names none (default %(default)s)")
    p.add_argument("--prompt", default=None, help="the prompt of a request that names none: a name (see `moee prompts`) or a template with {text}")
    p.add_argument("--alpha", type=non_negative_float, default=1.0, help="moee-sum weight of RW, a number >= 0 (default %(default)s)")
    p.add_argument("--no-normalize", action="store_true", help="return raw vectors unless a request asks for normalize (default: unit length, as OpenAI's)")
    p.add_argument("--max-input-tokens", type=positive_int, default=None, metavar="N",
                   help="tokens per input, prompt included (default and at most: the model's context)")
    p.add_argument("--truncate", action="store_true", help="cut over-long inputs (the text, never the prompt) instead of answering 400")
    p.add_argument("--max-inputs", type=positive_int, default=None, metavar="N", help="inputs per request (default 2048, at most --max-queue)")
    p.add_argument("--max-batch-size", type=positive_int, default=32, metavar="N", help="inputs per computed batch (default %(default)s)")
    p.add_argument("--max-batch-tokens", type=positive_int, default=16384, metavar="N",
                   help="tokens per computed batch, as padded: inputs x the longest (default %(default)s; one longer input still runs alone)")
    p.add_argument("--batch-wait-ms", type=non_negative_float, default=20.0, metavar="MS",
                   help="after a batch that answered N requests, wait up to this long for N inputs before the next batch "
                        "(default %(default)s; 0: never wait)")
    p.add_argument("--max-queue", type=positive_int, default=4096, metavar="N", help="inputs waiting at most; more is a 429 (default %(default)s)")
    p.add_argument("--max-body", type=byte_size, default=32 * 2**20, metavar="SIZE", help="request body size at most, e.g. 32MB (default 32 MiB)")
    p.add_argument("--read-timeout", type=non_negative_float, default=30.0, metavar="S", help="seconds to receive a body; slower is a 408 (default %(default)s)")
    p.add_argument("--shutdown-timeout", type=non_negative_float, default=30.0, metavar="S",
                   help="after SIGTERM/SIGINT, seconds the accepted requests may take to finish (default %(default)s)")
    p.add_argument("--no-shared-prefix", action="store_true", help="run every prompt from its first token (see moee embed --help)")
    p.set_defaults(run=cmd_serve)


def cmd_serve(ns) -> int:
    from ..serve import require_serve

    require_serve()
    from ..serve.app import ServeConfig, Service
    from ..serve.server import bind, is_loopback, run_server

    api_key = ns.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(ns.host) and api_key is None and not ns.allow_unauthenticated:
        raise UsageError(f"--host {ns.host} is reachable from other machines: give --api-key (or ${API_KEY_ENV}), "
                         "or --allow-unauthenticated to serve anyone")
    max_inputs = ns.max_inputs if ns.max_inputs is not None else min(2048, ns.max_queue)
    if max_inputs > ns.max_queue:
        raise UsageError(f"--max-inputs {max_inputs} is more than --max-queue {ns.max_queue}: such a request could never be queued")
    sock = bind(ns.host, ns.port)  # before minutes of loading: a port in use is known at once
    try:
        embedder = load_embedder(ns)
        config = ServeConfig(
            model_name=ns.served_model_name or str(ns.model), kind=ns.kind, prompt=ns.prompt, normalize=not ns.no_normalize,
            alpha=ns.alpha, max_input_tokens=ns.max_input_tokens, truncate=ns.truncate, max_inputs=max_inputs, max_body=ns.max_body,
            read_timeout=ns.read_timeout, api_key=api_key, max_batch_size=ns.max_batch_size, max_batch_tokens=ns.max_batch_tokens,
            max_queue=ns.max_queue, batch_wait=ns.batch_wait_ms / 1000, shutdown_timeout=ns.shutdown_timeout,
        )
        service = Service(embedder, config)
        dtype = str(embedder.model.dtype).removeprefix("torch.")
        mode = " int8" if getattr(embedder.model, "int8", False) else " layer-streamed" if embedder.streamed else ""
        ready = f"model {config.model_name}, dtype {dtype}{mode}, kind {config.kind}" + (", API key required" if api_key else "")
        return run_server(service, sock, ready)
    finally:
        sock.close()
