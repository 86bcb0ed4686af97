"""The device-side half of capture binding: the customer's app holds a key pair (Ed25519, or
ECDSA P-256), remembers what each session showed the user and signs the transaction context of
that session and the payloads it sends. Before its key is bound to the subject it signs as a new
device (``CaptureBinding.public_key``); after ``RegisterDevice`` it signs with its ``device_id``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ._api.v1 import common_pb2, mfa_pb2
from .context import payload_digest, push_answer_context, push_fetch_context, shown, transaction_context


def device_info(install_id: str, platform: str = "android", **fields) -> mfa_pb2.DeviceInfo:
    """What the app reports about itself; ``install_id`` is an app-generated random id."""
    return mfa_pb2.DeviceInfo(platform=platform, install_id=install_id, **fields)


class Device:
    """A phone or browser with its signing key. ``device``: the DeviceInfo it reports; ``ec``: a
    P-256 key instead of Ed25519; ``key``: an existing private key (see :meth:`load`)."""

    def __init__(self, device: mfa_pb2.DeviceInfo | None = None, ec: bool = False,
                 key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey | None = None, device_id: str = "") -> None:
        self.key = key or (_ec_key() if ec else Ed25519PrivateKey.generate())
        self.device = device or device_info("install-" + self.public_der[-8:].hex())
        self.device_id = device_id
        self.shown: dict[str, dict] = {}  # session id -> what the session is for, as the app showed it

    # ------------------------------------------------------------------ the key
    @property
    def public_der(self) -> bytes:
        """SubjectPublicKeyInfo (DER): what RegisterDevice and a new device's binding carry."""
        return self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.key, Ed25519PrivateKey):
            return self.key.sign(data)
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))

    def save(self, path: Path) -> None:
        """The private key (PKCS#8 PEM, mode 0600) and the device id beside it (``path``.id)."""
        pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when an older file was left open
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        Path(f"{path}.id").write_text(self.device_id)

    @classmethod
    def load(cls, path: Path, device: mfa_pb2.DeviceInfo | None = None) -> Device:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        if not isinstance(key, (Ed25519PrivateKey, ec.EllipticCurvePrivateKey)):
            raise ValueError(f"{path}: not an Ed25519 or EC P-256 private key")
        id_file = Path(f"{path}.id")
        return cls(device, key=key, device_id=id_file.read_text().strip() if id_file.exists() else "")

    # ------------------------------------------------------------------ sessions and signatures
    def opened(self, request: mfa_pb2.StartAuthenticationRequest, response: mfa_pb2.StartAuthenticationResponse):
        """Keeps what the session shows the user; returns the response."""
        self.shown[response.session_id] = shown(request, response)
        return response

    def context(self, session, evidence: Sequence[str] = ()) -> bytes:
        """The transaction context of ``session`` (its id or start response) and payload digests."""
        sid = session if isinstance(session, str) else session.session_id
        return transaction_context(**self.shown[sid], evidence=list(evidence))

    def proof(self, session, send_context: bool = True) -> mfa_pb2.DeviceProof:
        """Proof of possession of the bound key (SubmitFactor ``device``)."""
        context = self.context(session)
        return mfa_pb2.DeviceProof(device_id=self.device_id, signature=self.sign(context),
                                   context=context if send_context else b"")

    def binding(self, session, payloads: Sequence[bytes], send_context: bool = True) -> mfa_pb2.CaptureBinding:
        """The signature binding ``payloads`` (in the order sent) to the session and this device."""
        context = self.context(session, [payload_digest(p) for p in payloads])
        b = mfa_pb2.CaptureBinding(signature=self.sign(context), context=context if send_context else b"")
        if self.device_id:
            b.device_id = self.device_id
        else:
            b.public_key = self.public_der
        return b

    def face(self, session, image: bytes, **kw) -> mfa_pb2.FaceEvidence:
        """A signed selfie."""
        return mfa_pb2.FaceEvidence(image=common_pb2.Image(data=image), binding=self.binding(session, [image], **kw))

    def burst(self, session, frames: list[common_pb2.Frame], nonce: str) -> mfa_pb2.FaceEvidence:
        """A signed burst answering the session's active liveness challenge ``nonce``."""
        return mfa_pb2.FaceEvidence(frames=frames, challenge_nonce=nonce,
                                    binding=self.binding(session, [f.image.data for f in frames]))

    def voice(self, session, audio: bytes, nonce: str = "") -> mfa_pb2.VoiceEvidence:
        """A signed recording answering the session's digit challenge ``nonce``."""
        return mfa_pb2.VoiceEvidence(audio=common_pb2.Audio(data=audio), challenge_nonce=nonce,
                                     binding=self.binding(session, [audio]))

    # ------------------------------------------------------------------ push confirmations
    def push_fetch(self, push_data: Mapping[str, str]) -> mfa_pb2.GetPushConfirmationRequest:
        """The signed request for what a received push asks to confirm. The push (FCM, APNs) carries
        only ids (``cid``, ``sid``); send this with ``BioGate.get_push_confirmation``."""
        if push_data.get("type") != "biogate.confirm":
            raise ValueError("not a BioGate push confirmation")
        sid, cid = push_data["sid"], push_data["cid"]
        return mfa_pb2.GetPushConfirmationRequest(
            session_id=sid, confirmation_id=cid, device_id=self.device_id,
            signature=self.sign(push_fetch_context(sid, cid, self.device_id)))

    @staticmethod
    def confirmation(fetched: mfa_pb2.GetPushConfirmationResponse) -> dict:
        """What the confirmation asks the customer to confirm (action, amount, payee, where it
        started): show all of it before asking approve or deny and the number on the bank's screen."""
        return json.loads(fetched.fields)

    def answer_push(self, fetched: mfa_pb2.GetPushConfirmationResponse | Mapping, answer: str,
                    number: str) -> mfa_pb2.PushAnswer:
        """The signed answer ("approve" or "deny") to a confirmation (GetPushConfirmation's response,
        or its fields as :meth:`confirmation` parsed them), with the ``number`` the user typed from
        the bank's screen (number matching); send it with ``BioGate.confirm_transaction``."""
        fields = self.confirmation(fetched) if isinstance(fetched, mfa_pb2.GetPushConfirmationResponse) else fetched
        context = push_answer_context(fields, answer, number)
        return mfa_pb2.PushAnswer(confirmation_id=fields["cid"], device_id=self.device_id, context=context,
                                  signature=self.sign(context))


def _ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())
