"""One class per factor, all behind the same template method (see base.py)."""

from .base import Factor, FactorContext
from .device import DeviceFactor
from .face import FaceFactor
from .push import PushFactor
from .sms_otp import SmsOtpFactor
from .voice import VoiceFactor

FACTORS: dict[str, Factor] = {f.name: f for f in (FaceFactor(), VoiceFactor(), SmsOtpFactor(), DeviceFactor(),
                                                   PushFactor())}
# SubmitFactorRequest's oneof field -> factor
BY_EVIDENCE = {"face": "face", "voice": "voice", "otp": "sms_otp", "device": "device", "answer": "push"}

__all__ = ["BY_EVIDENCE", "FACTORS", "Factor", "FactorContext"]
