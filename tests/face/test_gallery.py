"""1:N galleries at 100,000 encrypted templates: exact top-k, and consistency with enrolments,
replacements and erasures made through another storage connection (another process)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from services.common.crypto import EnvelopeCrypto, open_keyring
from services.common.storage import ConsentRecord, TemplateRecord, open_storage
from services.common.subjects import IDENTIFICATION, VERIFICATION
from services.face.embedding import l2_normalise
from services.face.gallery import Galleries
from services.common.modality.templates import TemplateVault, pack, unpack

N = 100_000
DIM = 192
MODEL = "mobilefacenet-arcface-192d"


def test_template_format_round_trip():
    v = l2_normalise(np.random.default_rng(0).normal(size=(1, DIM)))[0]
    assert np.array_equal(unpack(pack("face", MODEL, v), "face", MODEL), v)
    with pytest.raises(ValueError):
        unpack(b"XXXX" + pack("face", MODEL, v)[4:], "face", MODEL)


@pytest.fixture(scope="module")
def big_gallery(tmp_path_factory):
    from tests.conftest import make_settings

    settings = make_settings(tmp_path_factory.mktemp("gallery") / "data", storage={"sqlite_synchronous": "NORMAL"})
    settings.data_dir.mkdir(parents=True)
    storage = open_storage(settings.storage_dsn, settings.storage)
    vault = TemplateVault(EnvelopeCrypto(open_keyring(settings)), "face")
    rng = np.random.default_rng(7)
    vectors = l2_normalise(rng.normal(size=(N, DIM)).astype(np.float32))
    t = time.perf_counter()
    with storage.transaction():
        for i in range(N):
            envelope, key_id = vault.seal("bank-big", f"s{i:06d}", MODEL, vectors[i])
            storage.templates.put(TemplateRecord("bank-big", f"s{i:06d}", "face", MODEL, "", envelope, key_id, 1))
            consent(storage, f"s{i:06d}", VERIFICATION if i % 10 == 3 else IDENTIFICATION)
    print(f"stored {N} templates and consents in {time.perf_counter() - t:.1f} s")
    yield settings, storage, vault, vectors
    storage.close()


def consent(storage, subject: str, purpose: str) -> None:
    storage.subjects.record_consent(ConsentRecord("bank-big", subject, purpose, ("face",), "v1"))


def test_top_k_is_exact_at_100k_and_follows_other_processes(big_gallery):
    settings, storage, vault, vectors = big_gallery
    galleries = Galleries(storage, vault, check_s=0.0, full_check_s=3600.0)
    rng = np.random.default_rng(11)
    target = 4242
    probe = l2_normalise((vectors[target] + 0.05 * rng.normal(size=DIM)).astype(np.float32)[None])[0]
    identifiable = np.arange(N) % 10 != 3  # every tenth subject consented to 1:1 verification only
    n_id = int(identifiable.sum())

    t = time.perf_counter()
    top, size = galleries.search("bank-big", MODEL, probe, 10)
    load_s = time.perf_counter() - t
    assert size == n_id and top[0][0] == f"s{target:06d}"
    exact = np.where(identifiable, vectors @ probe, -np.inf)
    expected = np.argsort(-exact)[:10]
    assert [s for s, _ in top] == [f"s{i:06d}" for i in expected]
    assert np.allclose([v for _, v in top], exact[expected], atol=1e-5)
    # A subject without consent to identification is never a candidate, even for their own face.
    assert "s000013" not in [s for s, _ in galleries.search("bank-big", MODEL, vectors[13], 10)[0]]

    times = []
    for _ in range(20):
        t = time.perf_counter()
        galleries.search("bank-big", MODEL, probe, 10)
        times.append(time.perf_counter() - t)
    print(f"100k gallery: first search (load + decrypt) {load_s:.2f} s; warm search median "
          f"{1000 * np.median(times):.1f} ms (version and consent checks included)")
    assert galleries.resyncs == 1

    # Another process erases the target and replaces another subject's template.
    other = open_storage(settings.storage_dsn, settings.storage)
    try:
        other.templates.delete_for_subject("bank-big", f"s{target:06d}", "face")
        top, size = galleries.search("bank-big", MODEL, probe, 3)  # the count check sees the erasure
        assert size == n_id - 1 and f"s{target:06d}" not in [s for s, _ in top]
        envelope, key_id = vault.seal("bank-big", "s000007", MODEL, probe)
        other.templates.put(TemplateRecord("bank-big", "s000007", "face", MODEL, "", envelope, key_id, 1), replace=True)
    finally:
        other.close()
    decrypted = galleries.decrypted
    galleries.full_check_s = 0.0  # the periodic full check sees the re-enrolment
    top, size = galleries.search("bank-big", MODEL, probe, 3)
    assert size == n_id - 1 and top[0] == ("s000007", pytest.approx(1.0, abs=1e-5))
    assert galleries.decrypted - decrypted == 1  # only the changed template was decrypted again
    assert storage.templates.gallery_version("bank-big", "face", MODEL)[0] == N - 1
    assert storage.templates.count_gallery("bank-big", "face", MODEL, consent=IDENTIFICATION) == n_id - 1

    # The MFA service (another process) records a withdrawal: the count check sees it.
    other = open_storage(settings.storage_dsn, settings.storage)
    try:
        other.subjects.withdraw_consent("bank-big", "s000007", IDENTIFICATION)
        top, size = galleries.search("bank-big", MODEL, probe, 3)
        assert size == n_id - 2 and "s000007" not in [s for s, _ in top]
        consent(other, "s000007", IDENTIFICATION)
        assert galleries.search("bank-big", MODEL, probe, 1) == ([("s000007", pytest.approx(1.0, abs=1e-5))], n_id - 1)
        # With checks far apart a withdrawal still takes effect at once: the candidates are checked.
        galleries.check_s = galleries.full_check_s = 3600.0
        resyncs = galleries.resyncs
        other.subjects.withdraw_consent("bank-big", "s000007", IDENTIFICATION)
        top, size = galleries.search("bank-big", MODEL, probe, 3)
        assert size == n_id - 2 and "s000007" not in [s for s, _ in top] and galleries.resyncs == resyncs + 1
    finally:
        other.close()
    galleries.check_s = 0.0

    # This process's own enrolment updates the loaded gallery without a resync, and leaves out a
    # subject whose consent does not cover identification.
    consent(storage, "s-new", IDENTIFICATION)  # consents come first, and each is a change to resync for
    consent(storage, "s-quiet", VERIFICATION)
    galleries.search("bank-big", MODEL, probe, 1)
    resyncs = galleries.resyncs
    envelope, key_id = vault.seal("bank-big", "s-new", MODEL, -probe)
    rec = storage.templates.put(TemplateRecord("bank-big", "s-new", "face", MODEL, "", envelope, key_id, 1))
    galleries.enrolled("bank-big", MODEL, "s-new", rec.updated_at, -probe, new=True)
    top, size = galleries.search("bank-big", MODEL, -probe, 1)
    assert size == n_id - 1 and top[0][0] == "s-new" and galleries.resyncs == resyncs
    envelope, key_id = vault.seal("bank-big", "s-quiet", MODEL, probe)
    rec = storage.templates.put(TemplateRecord("bank-big", "s-quiet", "face", MODEL, "", envelope, key_id, 1))
    galleries.enrolled("bank-big", MODEL, "s-quiet", rec.updated_at, probe, new=True)
    top, size = galleries.search("bank-big", MODEL, probe, 3)
    assert size == n_id - 1 and "s-quiet" not in [s for s, _ in top] and galleries.resyncs == resyncs
