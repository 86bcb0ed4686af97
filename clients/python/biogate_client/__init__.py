"""BioGate client SDK: the flows a bank's systems and apps run against the BioGate services.

    from biogate_client import BioGate, Device
    bg = BioGate.development()                      # 127.0.0.1:50051-50053, var/dev-credentials.json
    s = bg.start("bank-a", "cust-1", Device())      # the customer's app signs its captures
    s.submit_face(selfie); s.send_otp(); s.submit_otp(code)
    claims = bg.verify_token(s.decide().token, "bank-a", s.id)
"""

from .client import BioGate, Session, outcome_name, subject_ref
from .context import payload_digest, push_answer_context, push_fetch_context, transaction_context, webauthn_challenge
from .credentials import Credentials, dev_credentials
from .dev import dev_otp, dev_push
from .device import Device, device_info
from .errors import (
    AlreadyExists, BioGateError, DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, NotFound,
    PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable, from_rpc_error,
)
from .tokens import load_jwks, verify_decision

__all__ = [
    "AlreadyExists", "BioGate", "BioGateError", "Credentials", "DeadlineExceeded", "Device", "FailedPrecondition",
    "Internal", "InvalidArgument", "NotFound", "PermissionDenied", "ResourceExhausted", "Session", "Unauthenticated",
    "Unavailable", "dev_credentials", "dev_otp", "dev_push", "device_info", "from_rpc_error", "load_jwks", "outcome_name",
    "payload_digest", "push_answer_context", "push_fetch_context", "subject_ref", "transaction_context", "verify_decision", "webauthn_challenge",
]
