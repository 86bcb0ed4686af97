"""Checking the webhooks BioGate's MFA sends the bank (``review.opened``, ``review.closed``).

    from biogate_client import webhooks
    body = request.raw_body                                   # the bytes received, before any JSON parsing
    webhooks.verify(["whsec-new...", "whsec-old..."], request.headers[webhooks.SIGNATURE_HEADER],
                    body, time.time())                        # ValueError: answer 400, do not act
    event_id = request.headers[webhooks.EVENT_HEADER]         # delivery is at least once: deduplicate on it

The code is the MFA's own (biogate_client/_api/webhook_signature.py is generated from
services/common/webhook_signature.py), so the receiver checks exactly what the sender signs.
"""

from ._api.webhook_signature import EVENT_HEADER, MAX_SIGNATURES, SIGNATURE_HEADER, TOLERANCE_S, signature, verify

__all__ = ["EVENT_HEADER", "MAX_SIGNATURES", "SIGNATURE_HEADER", "TOLERANCE_S", "signature", "verify"]
