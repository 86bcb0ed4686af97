"""Verifying a signed decision (the DecideResponse token) as a relying party: EdDSA or ES256 JWTs
whose keys are published as a JWK set, by ``MfaService.GetSigningKeys`` or over HTTP
(``/.well-known/jwks.json``). Any source works: a JWKS dict, its JSON text, or a URL."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import jwt

ALGORITHMS = ("EdDSA", "ES256")
ISSUER = "biogate-mfa"


def load_jwks(source: dict | str) -> dict[str, Any]:
    """A JWK set from a dict, JSON text, or an http(s) URL."""
    if isinstance(source, dict):
        return source
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=10) as response:  # noqa: S310 (the scheme is checked)
            return json.loads(response.read())
    return json.loads(source)


def verify_decision(token: str, jwks: dict | str, *, tenant: str, session_id: str, issuer: str = ISSUER,
                    action: str | None = None, amount: tuple[str, int] | None = None) -> dict[str, Any]:
    """The claims of a decision token after checking its signature (the key named by ``kid``),
    algorithm (EdDSA or ES256 only, matching the key), issuer (``mfa.issuer`` of the deployment),
    audience (the tenant), expiry, that it is an ALLOW (the MFA signs nothing else), that it decides
    ``session_id`` (required: any other ALLOW of the tenant, a login's for a payment, would pass
    without it) and, given them, the ``action`` and ``amount`` (currency, minor units) the relying
    party is about to carry out. Raises ``jwt.InvalidTokenError``."""
    header = jwt.get_unverified_header(token)
    if header.get("alg") not in ALGORITHMS:
        raise jwt.InvalidAlgorithmError(f"algorithm {header.get('alg')!r} is not allowed")
    keys = load_jwks(jwks).get("keys") or []
    keyset = {k.key_id: k for k in jwt.PyJWKSet(keys).keys} if keys else {}
    key = keyset.get(header.get("kid", ""))
    if key is None:
        raise jwt.InvalidKeyError("the token's key (kid) is not in the JWKS")
    if (key.key_type, header["alg"]) not in (("OKP", "EdDSA"), ("EC", "ES256")):
        raise jwt.InvalidAlgorithmError("the token's algorithm does not match its key")
    claims = jwt.decode(token, key.key, algorithms=[header["alg"]], issuer=issuer, audience=tenant,
                        options={"require": ["exp", "iat", "iss", "aud", "sid"]})
    if claims.get("decision") != "allow":
        raise jwt.InvalidTokenError(f"the token's decision is {claims.get('decision')!r}, not 'allow'")
    if not session_id or claims["sid"] != session_id:
        raise jwt.InvalidTokenError("the token decides another session")
    if action is not None and claims.get("act") != action:
        raise jwt.InvalidTokenError(f"the token allows {claims.get('act')!r}, not {action!r}")
    if amount is not None and claims.get("amt") != {"cur": amount[0], "minor": amount[1]}:
        raise jwt.InvalidTokenError("the token allows another amount")
    return claims
