"""Signed decisions: short-lived EdDSA (Ed25519) JWTs, their JWKS, and key rotation.

Keys live in a vault of the key backend (services/common/crypto/backend.py): a JSON file (mode
0600) shared by replicas through the data directory, re-read when its mtime changes, rotation
holding a file lock; or a PKCS#11 token the replicas share, the keys never leaving it.
The newest key signs. A rotated-out key stays in the JWKS until every token it signed has
expired (token lifetime plus a leeway), then it is dropped.

Claims: ``iss``; ``aud`` the tenant; ``sub`` the subject's keyed pseudonym, not the bank's
customer reference (tokens travel through apps and browsers and end up in logs; the relying party
binds the token to its customer by ``sid``, the session it opened for that customer); ``sid``;
``act`` the action and, for payments, ``amt`` (dynamic linking); ``decision``; ``amr`` (RFC 8176);
``acr``; ``iat``/``nbf``/``exp``; ``jti``.

Only an ALLOW is a token. A DENY, REVIEW or STEP_UP gets none (the DecideResponse says the outcome
and its reasons, the audit trail keeps it): a signed "deny" would still be a valid, unexpired,
correctly signed JWT for the session's tenant, and a relying party that checks signature, issuer,
audience and expiry but forgets the ``decision`` claim would let it in. So TokenIssuer refuses to
sign any other decision and verify_token refuses any token whose ``decision`` is not ``allow``;
``decision`` stays in the claims so that what was decided is said plainly.

Relying parties fetch the keys from the MFA's HTTP endpoint (services/mfa/wellknown.py:
``/.well-known/jwks.json``, named by ``/.well-known/openid-configuration``) or by the authenticated
MfaService.GetSigningKeys.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt

from services.common.crypto.provision import KeyAudit, audited
from services.common.crypto.signing import FileKeyVault, Signer, SigningKeyVault, b64url, public_jwk

if TYPE_CHECKING:
    from services.mfa.config import MfaSettings

LEEWAY_S = 60


class SigningKeys:
    """The rotating set of decision-token keys in a vault (a JSON file, or a PKCS#11 token)."""

    def __init__(self, vault: SigningKeyVault | Path, token_ttl_s: int, max_age_s: int,
                 clock: Callable[[], float] = time.time, audit: KeyAudit | None = None) -> None:
        self.vault = FileKeyVault(vault) if isinstance(vault, Path) else vault
        self.token_ttl_s, self.max_age_s, self.clock = token_ttl_s, max_age_s, clock
        self.audit = audit  # every key made is audited through it (None: a test's own vault)
        self._lock = threading.Lock()
        if not self.vault.entries():
            self.rotate()

    @classmethod
    def from_settings(cls, settings: MfaSettings, clock: Callable[[], float] = time.time,
                      audit: KeyAudit | None = None) -> SigningKeys:
        from services.common.crypto.backend import open_token_vault

        cfg = settings.mfa
        keys_file = cfg.signing_keys_file or settings.data_dir / "keys" / "mfa-token-keys.json"
        return cls(open_token_vault(settings, keys_file), cfg.token_ttl_s, cfg.signing_key_max_age_s, clock, audit)

    def _expired(self, entry: dict[str, Any], now: float) -> bool:
        return entry.get("retired") is not None and now - entry["retired"] > self.token_ttl_s + LEEWAY_S

    def rotate(self) -> str:
        """A new signing key; the previous one only verifies from now on. Audited: ``keys.adding``
        before it is generated (its id derives from its public key, so ``keys.added`` names it)."""
        with self._lock, self.vault.exclusive():
            now = self.clock()
            entries = self.vault.entries()
            keep: list[dict[str, Any]] = []
            drop: list[dict[str, Any]] = []
            for k in entries:
                if k.get("retired") is None:
                    k = {**k, "retired": now}
                (drop if self._expired(k, now) else keep).append(k)

            def create() -> dict[str, Any]:
                new = {**self.vault.generate(), "created": now, "retired": None}
                self.vault.save([*keep, new])
                return new

            planned = {"key": "mfa-token-signing", "algorithm": "EdDSA", "purpose": "rotate" if entries else "init"}
            new = audited(self.audit, [planned], create, lambda n: [{**planned, "key_id": n["kid"]}])
            for k in drop:
                self.vault.destroy(k)
            return new["kid"]

    def current(self) -> tuple[str, Signer]:
        live = [k for k in self.vault.entries() if k.get("retired") is None]
        if not live or self.clock() - live[-1]["created"] > self.max_age_s:
            self.rotate()
            return self.current()
        signer = self.vault.signer(live[-1])
        return signer.key_id, signer

    def jwks(self) -> dict[str, Any]:
        now = self.clock()
        keys = []
        for k in self.vault.entries():
            if not self._expired(k, now):
                keys.append(public_jwk(self.vault.signer(k).public_key, k["kid"]))
        return {"keys": keys}


class TokenIssuer:
    def __init__(self, keys: SigningKeys, issuer: str, ttl_s: int) -> None:
        self.keys, self.issuer, self.ttl_s = keys, issuer, ttl_s

    def issue(self, claims: dict[str, Any], now: float | None = None) -> tuple[str, float]:
        if claims.get("decision") != ALLOW:
            raise ValueError(f"a decision token is issued for an ALLOW only, not {claims.get('decision')!r}")
        now = time.time() if now is None else now
        kid, signer = self.keys.current()
        payload = {"iss": self.issuer, "iat": int(now), "nbf": int(now), "exp": int(now) + self.ttl_s,
                   "jti": uuid.uuid4().hex, **claims}
        header = {"alg": signer.algorithm, "kid": kid, "typ": "JWT"}
        signing_input = ".".join(b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, payload))
        signature = signer.sign(signing_input.encode("ascii"))
        return f"{signing_input}.{b64url(signature)}", payload["exp"]


ALGORITHMS = ("EdDSA", "ES256")  # ES256: tokens signed by an HSM without Ed25519
ALLOW = "allow"  # the only decision a token is ever issued for


def verify_token(token: str, jwks_json: str, issuer: str, audience: str) -> dict[str, Any]:
    """What a relying party does: pick the key by kid from the JWKS and check signature and
    claims. Raises jwt.InvalidTokenError (expired, tampered, unknown key, wrong audience, or a
    decision other than ALLOW)."""
    header = jwt.get_unverified_header(token)
    if header.get("alg") not in ALGORITHMS:
        raise jwt.InvalidAlgorithmError("only EdDSA and ES256 tokens are accepted")
    keyset = jwt.PyJWKSet.from_json(jwks_json)
    try:
        key = keyset[header.get("kid", "")]
    except KeyError:
        raise jwt.InvalidKeyError("the token's key is not in the key set") from None
    if key.key_type == "EC" and header["alg"] != "ES256" or key.key_type == "OKP" and header["alg"] != "EdDSA":
        raise jwt.InvalidAlgorithmError("the token's algorithm does not match its key")
    claims = jwt.decode(token, key.key, algorithms=[header["alg"]], issuer=issuer, audience=audience,
                        options={"require": ["exp", "iat", "sub", "sid", "decision"]})
    if claims["decision"] != ALLOW:
        raise jwt.InvalidTokenError(f"the token's decision is {claims['decision']!r}, not {ALLOW!r}")
    return claims
