import warnings

import numpy as np
import pytest

from services.voice import g711

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # stdlib up to 3.12 (this project requires < 3.13): the reference to match


ALL_CODES = bytes(range(256))
ALL_PCM = np.arange(-32768, 32768, dtype=np.int16)


def test_known_values():
    assert g711.ulaw_decode(b"\xff\x7f\x00\x80").tolist() == [0, 0, -32124, 32124]
    assert g711.alaw_decode(b"\xd5\x55\xaa\x2a").tolist() == [8, -8, 32256, -32256]
    assert g711.ulaw_encode([0, 32767, -32768]).tolist() == [0xFF, 0x80, 0x00]
    assert g711.alaw_encode([0, 32767, -32768]).tolist() == [0xD5, 0xAA, 0x2A]


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_tables_match_the_stdlib_reference(law):
    decode, encode = getattr(g711, f"{law}_decode"), getattr(g711, f"{law}_encode")
    ref_decode = np.frombuffer(getattr(audioop, f"{law}2lin")(ALL_CODES, 2), dtype=np.int16)
    ref_encode = np.frombuffer(getattr(audioop, f"lin2{law}")(ALL_PCM.tobytes(), 2), dtype=np.uint8)
    assert np.array_equal(decode(ALL_CODES), ref_decode)
    assert np.array_equal(encode(ALL_PCM), ref_encode)  # every one of the 65536 inputs


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_decode_then_encode_is_identity(law):
    decode, encode = getattr(g711, f"{law}_decode"), getattr(g711, f"{law}_encode")
    codes = np.arange(256, dtype=np.uint8)
    back = encode(decode(codes))
    if law == "ulaw":  # negative zero 0x7F encodes as positive zero 0xFF
        codes[0x7F] = 0xFF
    assert np.array_equal(back, codes)
