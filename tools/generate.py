"""`./tinylm generate`: stream a generation from an InferenceService to the terminal.

One prompt (`./tinylm generate "ROMEO:"`) or `--interactive`: a prompt loop with history (readline) where Ctrl-C
cancels the generation in flight (the server frees its slot) and returns to the prompt; Ctrl-D or `/quit` leaves.
The server is `--address`, else the local stack's inference service (`./tinylm up`).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Iterator, TextIO

import grpc

from protos import common_pb2, inference_pb2, inference_pb2_grpc
from rpc.client import channel
from tools.settings import Settings
from tools.stack import read_state

__all__ = ["main", "stream_generation", "build_request"]


def build_request(prompt: str, args: argparse.Namespace) -> inference_pb2.GenerateRequest:
    params = inference_pb2.SamplingParameters(
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop=args.stop,
    )
    if args.temperature is not None:
        params.temperature, params.has_temperature = args.temperature, True
    if args.seed is not None:
        params.seed, params.has_seed = args.seed, True
    model = common_pb2.ModelRef(id=args.model) if args.model else None
    return inference_pb2.GenerateRequest(prompt=prompt, params=params, model=model)


def stream_generation(stub, request, out: TextIO) -> Iterator[inference_pb2.GenerateResponse]:
    """Yields the response chunks while writing their text to `out` as it arrives."""
    call = stub.Generate(request)
    try:
        for chunk in call:
            if chunk.text:
                out.write(chunk.text)
                out.flush()
            yield chunk
    except KeyboardInterrupt:
        call.cancel()
        raise


def _reason(final: inference_pb2.GenerateResponse) -> str:
    return inference_pb2.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()


def _final_line(final: inference_pb2.GenerateResponse) -> str:
    t = final.timings
    error = f", error: {final.error}" if final.error else ""
    return (
        f"[{final.usage.completion_tokens} tokens, {_reason(final)}, TTFT {t.ttft_ms:.1f} ms, "
        f"{t.mean_inter_token_ms:.2f} ms/token{error}]"
    )


def generation_json(chunks: list[inference_pb2.GenerateResponse]) -> dict:
    """The one JSON object `generate --json` prints: the whole text, the finish reason by name, the error text."""
    final = chunks[-1] if chunks else None
    return {
        "text": "".join(c.text for c in chunks),
        "finish_reason": _reason(final) if final is not None else None,
        "completion_tokens": final.usage.completion_tokens if final is not None else 0,
        "error": final.error if final is not None else "the stream ended without a final chunk",
    }


def _one(stub, prompt: str, args: argparse.Namespace) -> int:
    # --json: machine output only (no streamed text before it on stdout).
    chunks = list(stream_generation(stub, build_request(prompt, args), io.StringIO() if args.json else sys.stdout))
    final = chunks[-1] if chunks else None
    if args.json:
        print(json.dumps(generation_json(chunks)))
    elif final is not None:
        print("\n" + _final_line(final), file=sys.stderr)
    return 1 if final is None or final.finish_reason == inference_pb2.FINISH_REASON_ERROR else 0


def _interactive(stub, args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (history and line editing for input())
    except ImportError:
        pass
    print("tinylm interactive: Ctrl-C stops a generation, Ctrl-D or /quit leaves.", file=sys.stderr)
    while True:
        try:
            prompt = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if prompt.strip() in ("/quit", "/exit"):
            return 0
        if not prompt:
            continue
        try:
            final = None
            for final in stream_generation(stub, build_request(prompt, args), sys.stdout):
                pass
            if final is not None:
                print("\n" + _final_line(final), file=sys.stderr)
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                print(f"\nerror: {err.code().name}: {err.details()}", file=sys.stderr)


def _address(args: argparse.Namespace) -> str | None:
    if args.address:
        return args.address
    state = read_state(Settings.from_env()) or {}
    return state.get("processes", {}).get("inference", {}).get("address")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinylm generate", description="Stream a generation from the inference service.")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (omit with --interactive)")
    p.add_argument("--interactive", "-i", action="store_true", help="a prompt loop with history")
    p.add_argument("--address", default=None, help="host:port of an InferenceService (default: the local stack's)")
    p.add_argument("--token", default=None, help="bearer token, if the server wants one")
    p.add_argument("--model", default=None, help="model id or name (default: the server's)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=None, help=">= 0; 0 is greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0, help="in (0, 1]; 0 means off")
    p.add_argument("--repetition-penalty", type=float, default=0.0, help="> 0; 0 means off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop sequence (repeatable, at most 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if not args.interactive and args.prompt is None:
        parser().error("give a prompt, or --interactive")
    address = _address(args)
    if address is None:
        print(
            "tinylm generate: no inference service; start one with `./tinylm up` (or `./tinylm serve`) "
            "or pass --address HOST:PORT",
            file=sys.stderr,
        )
        return 1
    with channel(address, token=args.token) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        try:
            return _interactive(stub, args) if args.interactive else _one(stub, args.prompt, args)
        except grpc.RpcError as err:
            print(f"tinylm generate: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
