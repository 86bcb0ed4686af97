"""A face or voice service as the server bootstrap runs it: the servicer, a thin mapping of each RPC
onto the service object's method of the same name (``Verify`` -> ``verify``), and the definition
whose warm-up loads the models.

The service object (services/<modality>/service.py) carries the RPC semantics; it offers
``warm_up() -> health details`` (loads the models and opens its readiness gate) and ``close()``.
"""

from __future__ import annotations

import inspect
import re
from typing import Callable, Protocol

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from services.common.config import CommonSettings
from services.common.context import caller
from services.common.metrics import MODEL_INFO
from services.common.runtime import Runtime
from services.common.server.bootstrap import ServiceDefinition


class ModalityService(Protocol):
    rt: Runtime

    def warm_up(self) -> dict[str, str]: ...

    def close(self) -> None: ...


def method_name(rpc: str) -> str:
    """The service method of an RPC: ``StartLivenessChallenge`` -> ``start_liveness_challenge``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", rpc).lower()


def servicer(base: type, descriptor: ServiceDescriptor, service: object) -> object:
    """An instance of the generated servicer class ``base`` whose every RPC hands its request (or
    request iterator) and the RPC's principal (``caller=``) to the service method of the same name
    and returns what that returns."""
    missing = [m.name for m in descriptor.methods if not callable(getattr(service, method_name(m.name), None))]
    if missing:
        raise ValueError(f"{type(service).__name__} has no method for the RPCs {missing} of {descriptor.full_name}")
    blind = [m.name for m in descriptor.methods
             if "caller" not in inspect.signature(getattr(service, method_name(m.name))).parameters]
    if blind:
        raise ValueError(f"{type(service).__name__}'s methods for the RPCs {blind} of {descriptor.full_name} take no "
                         "caller: each takes the RPC's principal as the keyword argument caller")

    def bound(method: Callable) -> Callable:
        def rpc(self, request, context):
            return method(request, caller=caller())

        return rpc

    namespace = {m.name: bound(getattr(service, method_name(m.name))) for m in descriptor.methods}
    return type(base.__name__, (base,), namespace)()


def definition(settings: CommonSettings, name: str, make_service: Callable[[Runtime], ModalityService],
               descriptor: ServiceDescriptor, base: type,
               add_to_server: Callable[[object, grpc.Server], None]) -> ServiceDefinition:
    """The definition of service ``name``: ``make_service`` gets the process's runtime and checks the
    configuration (a wrong model id raises here, before the server starts)."""
    rt = Runtime.open(settings, name)
    try:
        service = make_service(rt)
        handler = servicer(base, descriptor, service)
    except Exception:
        rt.close()
        raise

    def close() -> None:
        service.close()
        service.rt.close()

    result = ServiceDefinition(name=name, descriptors=[descriptor],
                               register=lambda server: add_to_server(handler, server), close=close,
                               readiness=rt.readiness())

    def warm_up() -> None:
        details = service.warm_up()
        result.details.update(details)
        MODEL_INFO.info({f"{name}_{_label(k)}": v for k, v in details.items()})

    result.warm_up = warm_up
    result.service = service
    return result


def _label(key: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in key)
