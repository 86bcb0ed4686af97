"""The one settings tree of a BioGate process: the shared sections (services/common/config.py) and
each service's own (services/face/config.py, services/voice/config.py, services/mfa/config.py), and
the kiosk gateway's (services/kiosk/config.py).

Precedence (highest first): environment variables ``BIOGATE_<SECTION>__<FIELD>``, the YAML file
(``load_config(path)`` or $BIOGATE_CONFIG), the defaults. Unknown keys anywhere are errors.
"""

from __future__ import annotations

import os
from typing import Any

from services.common.config import read_config_file
from services.face.config import FaceSettings
from services.kiosk.config import KioskSettings
from services.mfa.config import MfaSettings
from services.voice.config import VoiceSettings


class Settings(FaceSettings, VoiceSettings, MfaSettings, KioskSettings):
    """Every section: what `biogate` and the tests load; each service reads its part."""


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build the settings from an optional YAML file (or $BIOGATE_CONFIG) plus the environment."""
    data = read_config_file(path)
    data.update(overrides)
    return Settings(**data)
