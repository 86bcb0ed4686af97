"""Checks of request fields shared by the services, raising INVALID_ARGUMENT with the field named.

Every id (tenant, subject, policy version, reason code, idempotency key, device id, ...) and every
free-text label kept in storage or audit passes one of the two checks here before anything is
written. Both refuse personal data by :func:`services.common.privacy.is_personal_data`, the rule
the audit guard applies to the records these values end up in: a request the validation accepts
can never be refused by the audit after its write (issue 12).
"""

from __future__ import annotations

import re

import grpc

from services.common import errors
from services.common.api.v1 import common_pb2
from services.common.privacy import is_personal_data

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")  # fullmatch: "$" also matches before a final "\n"
PERSONAL = "PERSONAL_NUMBER_AS_ID"


def _personal(field: str, what: str) -> errors.ServiceError:
    # built directly: a field named "reason" would collide with invalid_argument's parameter
    return errors.ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{field} looks like a phone, ID, card or account number or an e-mail address; send an opaque {what}"
        " (a run of 12 or more digits counts as an account number: prefix it, e.g. cif-...)",
        PERSONAL, [(field, "looks like personal data")])


def plain_identifier(value: str) -> bool:
    """Whether ``value`` passes :func:`identifier` (for checks outside an RPC: the configuration)."""
    return bool(_ID.fullmatch(value)) and not is_personal_data(value)


def identifier(value: str, field: str) -> str:
    if not value:
        raise errors.ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field} is required", "INVALID_ARGUMENT",
                                  [(field, "required")])
    if not _ID.fullmatch(value):
        raise errors.ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"{field} must be 1-128 characters of letters, digits and . _ : @ -",
                                  "INVALID_ARGUMENT", [(field, "bad characters or length")])
    if is_personal_data(value):
        raise _personal(field, "reference")
    return value


def label(value: str, field: str, max_chars: int) -> str:
    """Free text kept in storage or audit (a device label, an evidence reference): printable, at
    most ``max_chars`` characters, no personal data."""
    if len(value) > max_chars or not value.isprintable():
        raise errors.ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"{field}: at most {max_chars} printable characters", "INVALID_ARGUMENT",
                                  [(field, "too long or not printable")])
    if is_personal_data(value):
        raise _personal(field, "text")
    return value


def subject_ref(ref: common_pb2.SubjectRef, field: str = "subject") -> tuple[str, str]:
    """(tenant_id, subject_id) of a SubjectRef. A subject id that looks like a phone, ID or card
    number is refused: the bank must send an opaque customer reference."""
    return identifier(ref.tenant_id, f"{field}.tenant_id"), identifier(ref.subject_id, f"{field}.subject_id")
