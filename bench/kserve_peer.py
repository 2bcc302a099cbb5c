"""The peer of bench/kserve.py: KServe's own `ModelServer` (the `kserve` package) serving one OpenVINO IR over the
Open Inference Protocol, written as an integrator would for a plant that runs KServe instead of the appliance.

It runs in the throwaway venv that bench/kserve.py makes (kserve is no dependency of the appliance), compiles the
IR with the firmware profile's properties, and infers in a thread from an async `predict` with one infer request
per slot the device asks for: a plain synchronous `predict` would run on KServe's event loop and serialise
every client.

    python -P bench/kserve_peer.py MODEL_XML NAME HTTP_PORT PROPERTIES_JSON   (-P: bench/kserve.py is not `kserve`)
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys

import numpy as np
import openvino as ov
from kserve import InferRequest, InferResponse, Model, ModelServer
from kserve.utils.utils import get_predict_response


class OpenVinoClassifier(Model):
    def __init__(self, name: str, network: str, properties: dict[str, str]):
        super().__init__(name)
        self.network = network
        self.properties = properties
        self.load()

    def load(self) -> bool:
        compiled = ov.Core().compile_model(self.network, "CPU", self.properties)
        self.output = compiled.output(0)
        self.idle: queue.SimpleQueue[ov.InferRequest] = queue.SimpleQueue()
        for _ in range(max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))):
            self.idle.put(compiled.create_infer_request())
        self.ready = True
        return self.ready

    def run(self, batch: np.ndarray) -> np.ndarray:
        request = self.idle.get()
        try:
            return request.infer({0: batch})[self.output].copy()
        finally:
            self.idle.put(request)

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        scores = await asyncio.to_thread(self.run, payload.inputs[0].as_numpy())
        return get_predict_response(payload, scores, self.name)


if __name__ == "__main__":
    network, name, port, properties = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    served = OpenVinoClassifier(name, network, properties)
    ModelServer(http_port=port, workers=1, enable_grpc=False, enable_latency_logging=False).start([served])
