"""imgpipe's KServe serving runtime: the ONNX export on onnxruntime, behind the Open Inference (v2) protocol.

    python -m imgpipe.serving.runtime --model_name imgpipe-classifier --model_dir /mnt/models

What the ServingRuntime ``imgpipe-onnx`` (k8s/serving/servingruntime-imgpipe.yaml) runs in the
``serve`` image, with the ``kserve`` SDK's model server (HTTP on ``--http_port``, 8080). This
module is the server's side alone: the model, its checks and the requests it takes are
:mod:`imgpipe.serving.model`'s (docs/serving.md), which imports no kserve. kserve 0.20 needs
pandas < 3, so only the serve image and the serve venv (``make test``: ``.venv/serve``) have it.

A request the model cannot take is a 400 with the v2 error body ``{"error": ...}``; a model
directory whose ONNX graph and card disagree is refused at load in one line (exit 1).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.rest import server as rest_server

from imgpipe.serving import model as serve_model
from imgpipe.serving.limits import MAX_INFLIGHT, RequestLimits, request_limit
from imgpipe.serving.model import OUTPUTS, BadRequest, open_model
from imgpipe.train.card import preprocessing_spec

__all__ = ["ImgpipeModel", "main"]


class ImgpipeModel(Model):
    """One imgpipe model as a KServe model: :func:`~imgpipe.serving.model.open_model` at load, v2 requests in :meth:`predict`."""

    def __init__(self, name: str, model_dir: str | Path, threads: int = 1) -> None:
        super().__init__(name)
        self.model_dir, self.threads = model_dir, threads
        self.card: dict[str, Any] = {}
        self.session: Any = None
        self.spec: Any = None  # the card's resize settings (ResizeSpec), None where it records none

    def load(self) -> bool:
        _, self.card, self.session = open_model(self.model_dir, self.threads)
        self.spec = preprocessing_spec(self.card)
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict[str, Any]]:
        return serve_model.input_types(self.card)

    def get_output_types(self) -> list[dict[str, Any]]:
        return serve_model.output_types(self.card)

    async def predict(self, payload: Any, headers: Mapping[str, str] | None = None) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput(f"imgpipe's runtime answers the v2 protocol only: POST /v2/models/{self.name}/infer")
        # Decoding, preprocessing and onnxruntime hold a CPU: off the event loop, which keeps answering health checks.
        return await asyncio.get_running_loop().run_in_executor(None, self._infer, payload)

    def _infer(self, request: InferRequest) -> InferResponse:
        try:
            serve_model.check_outputs([o.name for o in request.request_outputs or []])
            x = serve_model.model_input(self.card, self.spec, request.inputs)
        except BadRequest as exc:
            raise InvalidInput(str(exc)) from None
        tensors = serve_model.answer(self.card, self.session, x)
        outputs = []
        for name in OUTPUTS:
            out = InferOutput(name=name, shape=list(tensors[name].shape), datatype=serve_model.DATATYPES[name])
            out.set_data_from_numpy(tensors[name], binary_data=False)
            outputs.append(out)
        return InferResponse(
            response_id=request.id or "",
            model_name=self.name,
            infer_outputs=outputs,
            use_binary_outputs=request.use_binary_outputs,
            requested_outputs=request.request_outputs,
        )


class _DataPlane(DataPlane):
    """KServe's data plane, with a request it cannot decode answered 400 (the client's), not 500."""

    def decode(self, body: Any, headers: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().decode(body, headers, *args, **kwargs)
        except InvalidInput:
            raise
        except InferenceError as exc:  # kserve 0.20 decodes the binary extension's BYTES as UTF-8 text, which pictures are not
            raise InvalidInput(f"the request's binary data cannot be decoded ({str(exc)[:80]}...): send pictures as base64 strings in JSON") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"the request cannot be decoded: {type(exc).__name__}: {exc}"[:500]) from None


async def _invalid_request(_: Any, exc: Exception) -> Any:
    """FastAPI's own refusal of a body that is not a v2 request (422 ``{"detail": ...}``), as the v2 protocol's 400."""
    from fastapi.responses import JSONResponse

    errors = getattr(exc, "errors", lambda: [])()
    what = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors[:5]) or str(exc)
    return JSONResponse(status_code=400, content={"error": f"not a v2 inference request: {what}"[:1000]})


def main(argv: Sequence[str] | None = None) -> int:
    """Loads the model (refused in one line, exit 1) and serves it until stopped, on the address and within the bounds it prints."""
    from fastapi.exceptions import RequestValidationError
    from kserve import model_server

    parser = argparse.ArgumentParser(prog="python -m imgpipe.serving.runtime", parents=[model_server.parser], description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True, help="the model prefix, or a folder holding one (KServe: /mnt/models)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime's intra-op threads")
    parser.add_argument("--host", default="127.0.0.1", help="the HTTP address; 0.0.0.0 in a pod (the ServingRuntime passes it)")
    parser.add_argument("--max_body_mb", type=float, default=None, help="the largest request body (default: 64 prepared tensors of the card's size)")
    parser.add_argument("--max_inflight", type=int, default=MAX_INFLIGHT, help="requests with a body held at once; one more gets 503")
    parser.set_defaults(enable_grpc=False)  # kserve opens gRPC on every interface by default: only when asked
    args, _ = parser.parse_known_args(argv)
    model = ImgpipeModel(args.model_name, args.model_dir, threads=args.threads)
    try:
        model.load()
        if args.max_body_mb is not None and not args.max_body_mb > 0:
            raise ValueError(f"--max_body_mb must be > 0, got {args.max_body_mb}")
    except ValueError as exc:
        print(f"imgpipe.serving.runtime: {exc}", file=sys.stderr)
        return 1
    max_body = int(args.max_body_mb * (1 << 20)) if args.max_body_mb else request_limit(model.card, serve_model.MAX_IMAGES)
    _RESTServer.host = args.host
    model_server.RESTServer = _RESTServer
    server = ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, enable_grpc=args.enable_grpc)
    server.dataplane = _DataPlane(model_registry=server.registered_models)
    model_server.app.add_exception_handler(RequestValidationError, _invalid_request)
    model_server.app.add_middleware(RequestLimits, max_body=max_body, max_inflight=args.max_inflight)
    grpc = f"gRPC on [::]:{args.grpc_port} (every interface)" if args.enable_grpc else "no gRPC (--enable_grpc=true opens it)"
    print(
        f"imgpipe.serving.runtime: serving {args.model_name} on http://{args.host}:{args.http_port} (v2), {grpc}; "
        f"request bodies up to {max_body / (1 << 20):.1f} MiB, {args.max_inflight} at once",
        file=sys.stderr,
        flush=True,
    )
    server.start([model])
    return 0


class _RESTServer(rest_server.RESTServer):
    """kserve's REST server on :attr:`host` (kserve's own is fixed at 0.0.0.0)."""

    host = "127.0.0.1"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = self.host


if __name__ == "__main__":
    sys.exit(main())
