#!/usr/bin/env python3
"""A gRPC client that is not ours: grpcio (C-core) opening ONE bidi Telemetry.Stream.

With --unary it makes K unary Telemetry.Send calls instead and prints
  {"unary": K, "statuses": {"OK": n, "UNAVAILABLE": m, ...}}
(exit code 0 when every call ended OK).

Generates stubs from lab/proto/telemetry.proto at run time (grpcio-tools) into a temp dir,
sends K readings with header x-device-id, reads the acks and prints one JSON line:
  {"pod": x-pod, "headers": {initial metadata}, "trailers": {trailing metadata},
   "sent": K, "acked": n, "status": "OK", "details": ""}
Exit code 0 when the call ended OK and every reading was acked, else 1.

  python3 lab/py/device.py --target 127.0.0.1:PORT [--count K] [--device-id ID]
      [--header NAME:VALUE]... [--interval-ms MS] [--payload BYTES] [--timeout S] [--unary]
"""

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc

PROTO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto", "telemetry.proto")


def load_stubs(out_dir):
    """Compiles telemetry.proto into out_dir and imports (messages, stubs)."""
    proto_dir = os.path.dirname(os.path.abspath(PROTO))
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    code = protoc.main([
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        os.path.abspath(PROTO),
    ])
    if code != 0:
        raise SystemExit(f"protoc failed on {PROTO} (exit {code})")
    sys.path.insert(0, out_dir)
    return importlib.import_module("telemetry_pb2"), importlib.import_module("telemetry_pb2_grpc")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port (h2c)")
    parser.add_argument("--count", type=int, default=10, help="readings to send (K)")
    parser.add_argument("--device-id", default="py-device-0")
    parser.add_argument("--header", action="append", default=[], help="extra NAME:VALUE")
    parser.add_argument("--interval-ms", type=float, default=0.0, help="pause between readings")
    parser.add_argument("--payload", type=int, default=16, help="payload bytes per reading")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of the call (s)")
    parser.add_argument("--unary", action="store_true", help="K unary Send calls instead of one stream")
    args = parser.parse_args()

    metadata = [("x-device-id", args.device_id)]
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep:
            parser.error(f"bad --header {item!r}: expected NAME:VALUE")
        metadata.append((name.strip().lower(), value.strip()))

    with tempfile.TemporaryDirectory(prefix="streamlb-py-") as out_dir:
        pb2, pb2_grpc = load_stubs(out_dir)

        if args.unary:
            return unary_calls(args, pb2, pb2_grpc, metadata)

        yielded = [0]

        def readings():
            for seq in range(args.count):
                yielded[0] += 1
                yield pb2.Reading(
                    device_id=args.device_id,
                    seq=seq,
                    sent_unix_nanos=time.time_ns(),
                    payload=b"\x5a" * args.payload,
                )
                if args.interval_ms > 0:
                    time.sleep(args.interval_ms / 1000.0)

        result = {"pod": None, "headers": {}, "trailers": {}, "sent": 0, "acked": 0,
                  "status": "OK", "details": ""}
        with grpc.insecure_channel(args.target) as channel:
            stub = pb2_grpc.TelemetryStub(channel)
            call = stub.Stream(readings(), metadata=metadata, timeout=args.timeout)
            acked_seqs = set()
            try:
                for ack in call:
                    acked_seqs.add(ack.seq)
                result["status"] = call.code().name
            except grpc.RpcError as error:
                result["status"] = error.code().name
                result["details"] = error.details() or ""
            try:
                initial = call.initial_metadata() or ()
                trailing = call.trailing_metadata() or ()
            except grpc.RpcError:
                initial, trailing = (), ()
            result["headers"] = {k: v for k, v in initial if isinstance(v, str)}
            result["trailers"] = {k: v for k, v in trailing if isinstance(v, str)}
            result["pod"] = result["headers"].get("x-pod")
            result["sent"] = yielded[0]
            result["acked"] = len(acked_seqs)
        print(json.dumps(result), flush=True)
        ok = result["status"] == "OK" and result["acked"] == args.count
        return 0 if ok else 1


def unary_calls(args, pb2, pb2_grpc, metadata):
    """K unary calls on one channel; prints the count of each final status."""
    statuses = {}
    with grpc.insecure_channel(args.target) as channel:
        stub = pb2_grpc.TelemetryStub(channel)
        for seq in range(args.count):
            reading = pb2.Reading(device_id=args.device_id, seq=seq, sent_unix_nanos=time.time_ns(),
                                  payload=b"\x5a" * args.payload)
            try:
                stub.Send(reading, metadata=metadata, timeout=args.timeout)
                code = "OK"
            except grpc.RpcError as error:
                code = error.code().name
            statuses[code] = statuses.get(code, 0) + 1
            if args.interval_ms > 0:
                time.sleep(args.interval_ms / 1000.0)
    print(json.dumps({"unary": args.count, "statuses": statuses}), flush=True)
    return 0 if statuses.get("OK", 0) == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
