"""What every request shares: the model being served and its admission gates."""

from samplers import REGISTRY
from server.admission import QUEUE_FACTOR, Gate, Limits
from server.errors import APIError


class EngineState:
    """The model being served, whether its engine can take requests, and the admission gates."""

    def __init__(self, served_name: str, root: str, limits: Limits = Limits(),
                 adapters: dict[str, str] | None = None, trust_request_chat_template: bool = False):
        self.served_name = served_name
        self.root = root
        self.adapters = adapters or {}  # distilled model name -> its PEFT adapter directory
        self.trust_request_chat_template = trust_request_chat_template
        self.model = None  # samplers.vllm_engine.VllmModel once loaded
        self.draining = False  # told to stop: new requests are refused while those in flight finish
        self.in_flight = 0  # /v1 requests being answered, each until its response's last byte
        self.created = 0
        self.limits = limits
        self.gates = {}
        for name, sampler in REGISTRY.items():
            concurrent = limits.max_concurrent.get(name, sampler.default_max_concurrent)
            queued = limits.max_queued.get(name, QUEUE_FACTOR * concurrent)
            self.gates[name] = Gate(served_name, name, concurrent, queued)

    def served_names(self) -> list[str]:
        """The base model's name, then the distilled models'."""
        return [self.served_name, *self.adapters]

    def ready_model(self):
        if self.draining:
            raise APIError(503, "The server is draining before it stops: it finishes the requests it has and "
                           "takes no new ones.")
        if self.model is None:
            raise APIError(503, "The engine is still loading; retry when GET /health answers 200.")
        if self.model.errored:
            raise APIError(503, "The engine has stopped; the server must be restarted.")
        return self.model

