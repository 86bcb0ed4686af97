"""Enrols subjects in a loop until killed: one transaction per enrolment writes the consent row
and the template; the template id is printed only after the commit.

    python crash_child.py DSN TENANT FIRST_INDEX
"""

from __future__ import annotations

import hashlib
import sys

from services.common.storage import ConsentRecord, TemplateRecord, open_storage


def blob(i: int) -> bytes:
    return hashlib.shake_256(f"crash-test-{i}".encode()).digest(64 * 1024 + i % 97)


def main() -> None:
    dsn, tenant, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
    storage = open_storage(dsn)
    i = first
    while True:
        data = blob(i)
        digest = hashlib.sha256(data).hexdigest()
        subject = f"subject-{i:06d}"
        with storage.transaction():
            storage.subjects.record_consent(
                ConsentRecord(tenant, subject, "biometric_verification", ("face",), "v1", f"sha256:{digest}")
            )
            rec = storage.templates.put(
                TemplateRecord(tenant, subject, "face", "crash-model", "", data, "k1", 1, {"i": i, "sha256": digest})
            )
        print(rec.id, flush=True)
        i += 1


if __name__ == "__main__":
    main()
