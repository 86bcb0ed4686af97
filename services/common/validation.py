"""Checks of request fields shared by the services, raising INVALID_ARGUMENT with the field named."""

from __future__ import annotations

import re

from services.common import errors
from services.common.api.v1 import common_pb2
from services.common.privacy import looks_like_personal_number

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def identifier(value: str, field: str) -> str:
    if not value:
        raise errors.invalid_argument(f"{field} is required", **{field.replace(".", "__"): "required"})
    if not _ID.match(value):
        raise errors.invalid_argument(
            f"{field} must be 1-128 characters of letters, digits and . _ : @ -",
            **{field.replace(".", "__"): "bad characters or length"},
        )
    return value


def subject_ref(ref: common_pb2.SubjectRef, field: str = "subject") -> tuple[str, str]:
    """(tenant_id, subject_id) of a SubjectRef. A subject id that looks like a phone, ID or card
    number is refused: the bank must send an opaque customer reference."""
    tenant = identifier(ref.tenant_id, f"{field}.tenant_id")
    subject = identifier(ref.subject_id, f"{field}.subject_id")
    if looks_like_personal_number(subject):
        raise errors.invalid_argument(
            f"{field}.subject_id looks like a phone, ID or card number; send an opaque customer reference",
            reason="PERSONAL_NUMBER_AS_ID",
            **{f"{field}__subject_id": "looks like a personal number"},
        )
    return tenant, subject
