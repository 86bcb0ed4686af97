"""Human reviews that decide: GetReview's evidence, ResolveReview's signed final decision (and two
reviewers racing for it), expiry of unreviewed cases, and the signed webhooks to the bank, through
a real MFA server on loopback (SQLite and PostgreSQL) whose clock the test holds, and a real HTTP
receiver that checks every signature."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from services.common.api.v1 import common_pb2, mfa_pb2, mfa_pb2_grpc
from services.common.client import connect
from services.common.errors import details_of
from services.common import webhook_signature
from services.mfa.tokens import verify_token
from services.common.context import SYSTEM
from tests.conftest import present
from tests.mfa.conftest import OTP_POLICY, App, outbox_codes, settings_for, setup_subject, subject
from tests.mfa.hostile import RawServer

F = mfa_pb2
SECRET = "whsec-test-0123456789abcdef"
TTL_S = 3600
PHONE = "+8613800135678"
WAIT_S = 20.0  # bounded waits for the background worker; nothing asserts how long it took
TENANT = "review-bank"
# The SMS-code tenant, where a fraud-script phrase sends a session to review without raising the
# risk level (which would also ask for a second factor).
REVIEW_POLICY = OTP_POLICY.replace("version: otp-test-1", "version: review-test-1").replace("score: 60", "score: 10")


def with_review_tenant(tmp_path) -> None:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / f"{TENANT}.yaml").write_text(REVIEW_POLICY)


class Receiver:
    """The bank's webhook endpoint: verifies each request's signature against the test's clock
    with ``verify`` (the client SDK's in tests/mfa/test_sdk_webhooks.py); answers 500 to the first
    ``fail`` requests; holds requests while ``hold`` is set."""

    def __init__(self, clock, secret: str | list[str] = SECRET, verify=webhook_signature.verify) -> None:
        self.clock, self.fail, self.hold, self.secret, self.verify = clock, 0, threading.Event(), secret, verify
        self.released = threading.Event()
        self.requests: list[dict] = []  # {"event", "verified", "status", "event_id", "raw", "signature"}
        self.changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.hold.is_set():
                    receiver._record(None, body, self.headers, 0)
                    receiver.released.wait(WAIT_S)
                try:
                    receiver.verify(receiver.secret, self.headers[webhook_signature.SIGNATURE_HEADER], body,
                                    receiver.clock().timestamp())
                    verified = True
                except ValueError:
                    verified = False
                status = 500 if len([r for r in receiver.requests if r["status"]]) < receiver.fail else 200
                receiver._record(verified, body, self.headers, status)  # before the sender hears the answer
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/biogate"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _record(self, verified, body: bytes, headers, status: int) -> None:
        with self.changed:
            self.requests.append({"event": json.loads(body), "verified": verified, "status": status,
                                  "event_id": headers[webhook_signature.EVENT_HEADER], "raw": body,
                                  "signature": headers[webhook_signature.SIGNATURE_HEADER]})
            self.changed.notify_all()

    def delivered(self) -> list[dict]:
        return [r["event"] for r in self.requests if r["status"] == 200]

    def wait_for(self, predicate) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self), WAIT_S), self.requests

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(clock):
    r = Receiver(clock)
    yield r
    r.close()


def review_settings(tmp_path, dsn, url, **webhook):
    with_review_tenant(tmp_path)
    return settings_for(tmp_path, dsn, reviews={
        "ttl_s": TTL_S, "sweep_s": 3600,
        "webhook": {"url": url, "secret": SECRET, "backoff_s": 5, "max_attempts": 3, **webhook}})


@pytest.fixture
def served(tmp_path, storage_dsn, clock, receiver):
    """A real MFA server on loopback whose clock is the test's ``clock``."""
    from services.common.server.bootstrap import RunningServer
    from services.mfa.server import definition
    from services.serve import prepare

    settings = review_settings(tmp_path, storage_dsn, receiver.url)
    prepare(settings)
    server = RunningServer(settings, definition(settings, clock=clock), port=0).start()
    assert server.ready.wait(60)
    tokens = json.loads(settings.dev_credentials_file.read_text())
    channels = {name: connect(server.address, tokens[name]) for name in ("dev-all", "dev-admin", "dev-auditor")}
    yield settings, {name: mfa_pb2_grpc.MfaServiceStub(ch) for name, ch in channels.items()}
    for ch in channels.values():
        ch.close()
    server.stop(grace=0)


def under_review(stub, settings, sid="cust-0001", amount=250_000):
    """A payment a fraud-script phrase sends to review after a passed SMS code: the review id."""
    ref = setup_subject(stub, subject(TENANT, sid), phone=PHONE)
    s = stub.StartAuthentication(F.StartAuthenticationRequest(
        subject=ref, channel=F.CHANNEL_APP, action="payment", device=App().device,
        amount=F.Money(currency="CNY", amount_minor=amount),
        context=F.ContextSignals(country="CN", latitude=31.23, longitude=121.47,
                                 conversation_text="they told me to move it to a safe account")))
    stub.SendOtp(F.SendOtpRequest(session_id=s.session_id))
    stub.SubmitFactor(F.SubmitFactorRequest(session_id=s.session_id, otp=F.OtpEvidence(code=outbox_codes(settings)[-1])))
    d = stub.Decide(F.DecideRequest(session_id=s.session_id))
    assert d.outcome == F.OUTCOME_REVIEW and d.review_id
    return s.session_id, d.review_id


def reason(err: grpc.RpcError) -> str:
    return details_of(err)["reason"]


def audit_events(settings, event_type: str) -> list[dict]:
    from services.common.storage import open_storage

    store = open_storage(settings.storage_dsn)
    try:
        return [{"actor": r.actor, **json.loads(r.details)} for r in store.audit.iter_records()
                if r.event_type == event_type]
    finally:
        store.close()


def outbox_events(settings) -> dict[str, int]:
    from services.common.storage import open_storage

    store = open_storage(settings.storage_dsn)
    try:
        with store.db.read() as q:
            return dict(q.all("SELECT event_type, COUNT(*) FROM mfa_webhook_outbox GROUP BY event_type"))
    finally:
        store.close()


def jwks(stub) -> str:
    return stub.GetSigningKeys(F.GetSigningKeysRequest()).jwks_json


def test_a_reviewer_sees_the_evidence_and_no_personal_data(served):
    settings, stubs = served
    session_id, review_id = under_review(stubs["dev-all"], settings)
    listed = stubs["dev-auditor"].ListReviews(F.ListReviewsRequest(tenant_id=TENANT)).reviews
    assert [r.review_id for r in listed] == [review_id]
    case = stubs["dev-auditor"].GetReview(F.GetReviewRequest(review_id=review_id))
    r = case.review
    assert (r.status, r.session_id, r.action, r.subject.subject_id) == ("pending", session_id, "payment", "cust-0001")
    assert "FRAUD_SCRIPT_PHRASE" in [x.code for x in r.reasons]
    assert r.expires_at.ToSeconds() - r.created_at.ToSeconds() == TTL_S and not r.HasField("resolved_at")
    assert case.decision.outcome == F.OUTCOME_REVIEW and case.decision.review_id == review_id
    assert not case.decision.token  # the relying party's credential is no evidence
    assert (case.amount.currency, case.amount.amount_minor) == ("CNY", 250_000)
    assert case.channel == "app" and case.country == "CN" and case.policy_version == "review-test-1"
    assert case.risk.level == F.RISK_LEVEL_LOW and case.risk.score == 20
    assert [x.code for x in case.risk.reasons] == ["UNBOUND_DEVICE", "FRAUD_SCRIPT_PHRASE"]
    assert [(f.factor, f.passed, f.veto) for f in case.factors] == [(F.FACTOR_TYPE_SMS_OTP, True, False)]
    assert case.factors[0].llr == pytest.approx(3.0)
    assert case.device_state == "unbound" and case.session_started_at.ToSeconds() > 0
    wire = case.SerializeToString()
    # the transcript is scanned, never kept (the signal names the script's phrase), nor the coordinates
    for secret in (b"13800135678", b"they told me", b"31.23", outbox_codes(settings)[-1].encode()):
        assert secret not in wire
    # the auditor reads; only an administrator decides
    with pytest.raises(grpc.RpcError) as err:
        stubs["dev-auditor"].ResolveReview(F.ResolveReviewRequest(review_id=review_id, approve=True))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_approval_is_the_sessions_signed_allow_audited_and_sent_to_the_bank(served, receiver):
    settings, stubs = served
    session_id, review_id = under_review(stubs["dev-all"], settings)
    receiver.wait_for(lambda r: [e["type"] for e in r.delivered()] == ["review.opened"])
    note = f"called the customer back on {PHONE}, confirmed"
    done = stubs["dev-admin"].ResolveReview(F.ResolveReviewRequest(review_id=review_id, approve=True, note=note))
    assert (done.review.status, done.review.resolved_by) == ("approved", "dev-admin")
    assert done.review.HasField("resolved_at")
    d = done.decision
    assert d.outcome == F.OUTCOME_ALLOW and [x.code for x in d.reasons] == ["REVIEW_APPROVED"]
    assert list(d.amr) == ["sms"] and d.review_id == review_id
    claims = verify_token(d.token, jwks(stubs["dev-all"]), "biogate-mfa", TENANT)
    assert (claims["decision"], claims["sid"], claims["rid"], claims["rvw"]) == ("allow", session_id, review_id,
                                                                                "approved")
    assert claims["amt"] == {"cur": "CNY", "minor": 250_000} and claims["fac"][0]["f"] == "sms_otp"
    # the bank's Decide now answers the final decision, the same token
    again = stubs["dev-all"].Decide(F.DecideRequest(session_id=session_id))
    assert again.outcome == F.OUTCOME_ALLOW and again.token == d.token
    # a retry of the same resolution answers it again; nothing is written twice
    retry = stubs["dev-admin"].ResolveReview(F.ResolveReviewRequest(review_id=review_id, approve=True, note=note))
    assert retry.decision.token == d.token
    [audited] = audit_events(settings, "mfa.review_resolved")
    assert (audited["actor"], audited["outcome"], audited["decision"], audited["session_id"], audited["signed"]) == (
        "dev-admin", "approved", "allow", session_id, True)
    case = stubs["dev-admin"].GetReview(F.GetReviewRequest(review_id=review_id))
    assert "13800135678" not in case.note and "confirmed" in case.note
    assert case.decision.outcome == F.OUTCOME_ALLOW and not case.decision.token

    receiver.wait_for(lambda r: len(r.delivered()) == 2)
    opened, closed = receiver.delivered()
    assert all(r["verified"] for r in receiver.requests)
    assert closed["type"] == "review.closed" and closed["tenant_id"] == TENANT
    assert closed["data"]["status"] == "approved" and closed["data"]["review_id"] == review_id
    assert closed["data"]["decision"] == {"outcome": "allow", "reasons": ["REVIEW_APPROVED"], "decision_token": d.token}
    assert opened["data"]["reasons"] == [x.code for x in case.review.reasons]
    raw = b" ".join(r["raw"] for r in receiver.requests)
    for secret in (b"cust-0001", b"13800135678", b"they told me"):
        assert secret not in raw


def race(stubs, review_id: str) -> dict:
    """dev-admin approves and dev-all rejects at the same moment: each one's answer or error."""
    barrier, results = threading.Barrier(2), {}

    def resolve(who: str, approve: bool) -> None:
        barrier.wait()
        try:
            results[who] = stubs[who].ResolveReview(F.ResolveReviewRequest(review_id=review_id, approve=approve))
        except grpc.RpcError as err:
            results[who] = err
    threads = [threading.Thread(target=resolve, args=("dev-admin", True)),
               threading.Thread(target=resolve, args=("dev-all", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    return results


def test_two_reviewers_racing_one_wins_and_the_other_is_told(served, receiver):
    settings, stubs = served
    for n in range(3):
        session_id, review_id = under_review(stubs["dev-all"], settings, sid=f"cust-race-{n}")
        results = race(stubs, review_id)
        won = {k: v for k, v in results.items() if not isinstance(v, grpc.RpcError)}
        lost = {k: v for k, v in results.items() if isinstance(v, grpc.RpcError)}
        assert len(won) == 1 and len(lost) == 1, results
        [(winner, answer)] = won.items()
        [(loser, err)] = lost.items()
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and reason(err) == "REVIEW_ALREADY_RESOLVED"
        assert f"already {answer.review.status} by {winner}" in (err.details() or "")
        expected = F.OUTCOME_ALLOW if winner == "dev-admin" else F.OUTCOME_DENY
        assert answer.decision.outcome == expected
        assert stubs["dev-all"].Decide(F.DecideRequest(session_id=session_id)).outcome == expected
        assert [e["actor"] for e in audit_events(settings, "mfa.review_resolved")
                if e["review_id"] == review_id] == [winner]
    assert outbox_events(settings) == {"review.opened": 3, "review.closed": 3}  # the losers wrote none
    receiver.wait_for(lambda r: len([e for e in r.delivered() if e["type"] == "review.closed"]) == 3)
    closed = [e["data"]["review_id"] for e in receiver.delivered() if e["type"] == "review.closed"]
    assert len(set(closed)) == 3  # one closing event per review


def test_a_rejection_is_a_deny_without_a_token(served):
    settings, stubs = served
    session_id, review_id = under_review(stubs["dev-all"], settings)
    d = stubs["dev-admin"].ResolveReview(F.ResolveReviewRequest(review_id=review_id, approve=False)).decision
    assert d.outcome == F.OUTCOME_DENY and [x.code for x in d.reasons] == ["REVIEW_REJECTED"] and not d.amr
    assert not d.token and not d.acr  # only an ALLOW is a token (services/mfa/tokens.py)
    assert stubs["dev-all"].Decide(F.DecideRequest(session_id=session_id)).outcome == F.OUTCOME_DENY
    with pytest.raises(grpc.RpcError) as err:  # changing one's mind is a new session, not a second resolution
        stubs["dev-admin"].ResolveReview(F.ResolveReviewRequest(review_id=review_id, approve=True))
    assert reason(err.value) == "REVIEW_ALREADY_RESOLVED"


def test_an_unreviewed_case_expires_to_a_deny(served, clock, receiver):
    settings, stubs = served
    session_id, review_id = under_review(stubs["dev-all"], settings)
    clock.advance(TTL_S - 1)
    assert stubs["dev-all"].Decide(F.DecideRequest(session_id=session_id)).outcome == F.OUTCOME_REVIEW
    clock.advance(1)
    d = stubs["dev-all"].Decide(F.DecideRequest(session_id=session_id))  # read lazily: denied now
    assert d.outcome == F.OUTCOME_DENY and [x.code for x in d.reasons] == ["REVIEW_EXPIRED"]
    assert not d.token and d.review_id == review_id
    with pytest.raises(grpc.RpcError) as err:
        stubs["dev-admin"].ResolveReview(F.ResolveReviewRequest(review_id=review_id, approve=True))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and reason(err.value) == "REVIEW_EXPIRED"
    r = stubs["dev-admin"].GetReview(F.GetReviewRequest(review_id=review_id)).review
    assert (r.status, r.resolved_by) == ("expired", "system")
    assert not stubs["dev-admin"].ListReviews(F.ListReviewsRequest(tenant_id=TENANT)).reviews
    assert [x.review_id for x in stubs["dev-admin"].ListReviews(
        F.ListReviewsRequest(tenant_id=TENANT, status="expired")).reviews] == [review_id]
    [audited] = audit_events(settings, "mfa.review_expired")
    assert (audited["actor"], audited["decision"]) == ("system", "deny")
    receiver.wait_for(lambda r: any(e["data"]["status"] == "expired" for e in r.delivered()))
    [closed] = [e for e in receiver.delivered() if e["type"] == "review.closed"]
    assert closed["data"]["decision"] == {"outcome": "deny", "reasons": ["REVIEW_EXPIRED"]}


def review_in_process(orch, ref) -> tuple[str, str]:
    """A login a fraud-script phrase sends to review, on an in-process orchestrator: (session, review)."""
    s = orch.start(F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login",
                                                device=App().device,
                                                context=F.ContextSignals(conversation_text="AnyDesk please")), caller=SYSTEM)
    orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    orch.submit(F.SubmitFactorRequest(session_id=s.session_id,
                                      otp=F.OtpEvidence(code=outbox_codes(orch.rt.settings)[-1])), caller=SYSTEM)
    return s.session_id, orch.decide(F.DecideRequest(session_id=s.session_id), caller=SYSTEM).review_id


def test_the_sweep_expires_overdue_cases_without_a_caller(orch, clock, tmp_path):
    from services.mfa import subjects

    with_review_tenant(tmp_path)
    ref = common_pb2.SubjectRef(tenant_id=TENANT, subject_id="cust-sweep")
    subjects.set_phone_number(orch.rt, F.SetPhoneNumberRequest(subject=ref, phone_e164=PHONE), caller=SYSTEM)
    ids = []
    for _ in range(2):
        ids.append(review_in_process(orch, ref))
        clock.advance(60)
    ttl = orch.settings.mfa.reviews.ttl_s
    clock.advance(ttl - 61)
    assert orch.reviews.expire_due() == 1  # only the first is overdue
    assert orch.store.reviews.get(ids[0][1]).status == "expired"
    assert orch.store.reviews.get(ids[1][1]).status == "pending"
    assert orch.sessions.get(ids[0][0]).state.decision.outcome == "deny"
    clock.advance(60)
    assert orch.reviews.expire_due() == 1 and orch.reviews.expire_due() == 0


def test_the_final_decisions_of_reviews_are_counted_as_coming_from_a_review(orch, clock, tmp_path):
    """Decide's REVIEW was counted, the ALLOW or DENY its resolution or expiry made was not."""
    from services.mfa import subjects
    from tests.ops.samples import Counted

    with_review_tenant(tmp_path)
    refs = [common_pb2.SubjectRef(tenant_id=TENANT, subject_id=f"cust-counted-{i}") for i in range(3)]
    for ref in refs:
        subjects.set_phone_number(orch.rt, F.SetPhoneNumberRequest(subject=ref, phone_e164=PHONE), caller=SYSTEM)
    opened = Counted("biogate_mfa_decisions_total", outcome="review", source="decide")
    final = {(o, src): Counted("biogate_mfa_decisions_total", outcome=o, source=src)
             for o in ("allow", "deny") for src in ("decide", "review")}
    closing = {code: Counted("biogate_mfa_decision_reasons_total", outcome=o, reason=code)
               for o, code in (("allow", "REVIEW_APPROVED"), ("deny", "REVIEW_REJECTED"), ("deny", "REVIEW_EXPIRED"))}
    cases = [review_in_process(orch, ref) for ref in refs]
    approve, reject, expire = (review_id for _, review_id in cases)
    orch.reviews.resolve(approve, True, "", "admin-1")
    orch.reviews.resolve(approve, True, "", "admin-1")  # a retry answers again, it decides nothing new
    orch.reviews.resolve(reject, False, "", "admin-1")
    clock.advance(orch.settings.mfa.reviews.ttl_s)
    assert orch.reviews.expire_due() == 1 and orch.store.reviews.get(expire).status == "expired"
    orch.decide(F.DecideRequest(session_id=cases[0][0]), caller=SYSTEM)  # reading the final decision is no new one
    assert opened.delta == 3
    assert {k: c.delta for k, c in final.items()} == {
        ("allow", "decide"): 0, ("allow", "review"): 1, ("deny", "decide"): 0, ("deny", "review"): 2}
    assert {k: c.delta for k, c in closing.items()} == {"REVIEW_APPROVED": 1, "REVIEW_REJECTED": 1, "REVIEW_EXPIRED": 1}


def test_webhook_deliveries_retry_with_backoff_then_give_up(tmp_path, storage_dsn, clock, receiver):
    from services.commands import retention
    from services.common.runtime import Runtime
    from services.common.storage import SqlStorage
    from services.mfa.server import worker_tasks
    from services.mfa.service import Orchestrator
    from services.serve import prepare

    settings = review_settings(tmp_path, storage_dsn, receiver.url, backoff_s=5, max_attempts=3)
    prepare(settings)
    rt = Runtime.open(settings)
    o = Orchestrator(rt, clock=clock)
    try:
        outbox = o.outbox
        first = present(outbox.enqueue(TENANT, "review.opened", {"review_id": "rev_1"}, clock()))
        receiver.fail = 1
        assert outbox.deliver_due() == 0  # refused (500): retried after the backoff, not before
        assert present(o.store.webhooks.get(first.id)).attempts == 1
        clock.advance(4.9)
        assert outbox.deliver_due() == 0 and len(receiver.requests) == 1
        clock.advance(0.1)
        assert outbox.deliver_due() == 1
        rec = present(o.store.webhooks.get(first.id))
        assert rec.delivered_at == clock() and rec.next_attempt_at is None and rec.attempts == 2
        assert [r["event_id"] for r in receiver.requests] == [first.id, first.id]  # the same event, redelivered
        assert all(r["verified"] for r in receiver.requests)

        receiver.fail = 100  # a receiver that never takes it: 3 attempts, 5 s then 10 s apart, then abandoned
        gone = present(outbox.enqueue(TENANT, "review.closed", {"review_id": "rev_2"}, clock()))
        for wait in (0, 5, 10):
            clock.advance(wait)
            outbox.deliver_due()
        rec = present(o.store.webhooks.get(gone.id))
        assert (rec.attempts, rec.next_attempt_at, rec.delivered_at, rec.last_error) == (3, None, None, "HTTP 500")
        clock.advance(3600)
        assert outbox.deliver_due() == 0 and len(receiver.requests) == 5
        # delivered and abandoned events are deleted after mfa.reviews.webhook.keep_s, by `biogate
        # purge` alone: the review worker's own unbounded DELETE ran on every replica each sweep
        clock.advance(settings.mfa.reviews.webhook.keep_s + 1)
        for task in worker_tasks(o):
            task()
        assert o.store.webhooks.get(first.id) is not None and o.store.webhooks.get(gone.id) is not None
        assert isinstance(rt.storage, SqlStorage)
        deleted = retention.run(settings, rt.storage, "cli:test", clock(), batch=1)
        assert deleted["webhook_events"] == 2 and o.store.webhooks.get(first.id) is None
    finally:
        o.close()
        rt.close()


def test_a_slow_webhook_never_holds_the_resolution(served, receiver):
    settings, stubs = served
    receiver.hold.set()  # the bank's endpoint hangs
    session_id, review_id = under_review(stubs["dev-all"], settings)
    receiver.wait_for(lambda r: len(r.requests) == 1)  # the opening event is stuck at the receiver
    done = stubs["dev-admin"].ResolveReview(F.ResolveReviewRequest(review_id=review_id, approve=False), timeout=10)
    assert done.decision.outcome == F.OUTCOME_DENY
    receiver.hold.clear()
    receiver.released.set()
    receiver.wait_for(lambda r: [e["type"] for e in r.delivered()] == ["review.opened", "review.closed"])


def test_signatures_are_checked_over_the_exact_body_and_time():
    body = b'{"id":"evt_1","type":"review.opened"}'
    header = webhook_signature.signature(SECRET, body, 1_700_000_000)
    webhook_signature.verify(SECRET, header, body, 1_700_000_100)
    for bad_secret, bad_body, now in ((SECRET, body + b" ", 1_700_000_000), ("another-secret-0123", body, 1_700_000_000),
                                      (SECRET, body, 1_700_000_000 + 301)):
        with pytest.raises(ValueError):
            webhook_signature.verify(bad_secret, header, bad_body, now)
    with pytest.raises(ValueError, match="malformed"):
        webhook_signature.verify(SECRET, "v1=abc", body, 1_700_000_000)
    # what anyone can send the bank's receiver: a non-ASCII signature was a TypeError out of
    # hmac.compare_digest (a 500 where the receiver answers ValueError with 400)
    with pytest.raises(ValueError, match="does not match"):
        webhook_signature.verify(SECRET, "t=1700000000,v1=\u00e9\udcff", body, 1_700_000_000)


NEW, OLD = "whsec-new-0123456789abcdef", "whsec-old-0123456789abcdef"


def test_a_header_signed_under_several_secrets_passes_a_receiver_knowing_any_one_of_them():
    """verify() read the header through dict(), which kept only the last v1: a receiver knowing only
    the newest of two active secrets refused every request while the old one still signed too."""
    body, t = b'{"id":"evt_1","type":"review.opened"}', 1_700_000_000
    header = webhook_signature.signature([NEW, OLD], body, t)
    assert header.split(",") == [f"t={t}", webhook_signature.signature(NEW, body, t).split(",")[1],
                                 webhook_signature.signature(OLD, body, t).split(",")[1]]
    for knows in (NEW, OLD, [NEW], [OLD], [OLD, NEW], ["another-secret-0123", NEW]):
        webhook_signature.verify(knows, header, body, t + 10)
    webhook_signature.verify(NEW, f"{header},v0=ignored,v2=a-future-scheme", body, t)
    for knows in ("another-secret-0123", ["another-secret-0123", "and-another-one-0123"]):
        with pytest.raises(ValueError, match="does not match"):
            webhook_signature.verify(knows, header, body, t)
    with pytest.raises(ValueError, match="does not match"):
        webhook_signature.verify([NEW, OLD], header, body + b" ", t)
    with pytest.raises(ValueError, match="outside the tolerance"):
        webhook_signature.verify([NEW, OLD], header, body, t + 301)
    with pytest.raises(ValueError, match="no secret"):
        webhook_signature.verify([], header, body, t)
    sig = header.split(",")[1]
    for malformed in (f"t={t}", f"t={t},v1", f"t={t},t={t},{sig}", f"{sig},{sig}", f"t=+{t},{sig}", f"t= {t},{sig}",
                      f"t={t}.5,{sig}", "t=\uff11\uff17\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10," + sig, ""):
        with pytest.raises(ValueError, match="malformed"):
            webhook_signature.verify([NEW, OLD], malformed, body, t)
    with pytest.raises(ValueError, match="does not match"):
        webhook_signature.verify([NEW, OLD], f"t={t},v1=\u00e9\udcff,v1=\u00e9", body, t)


def test_a_secret_is_rotated_without_a_receiver_refusing_a_request(tmp_path, storage_dsn, clock):
    """One shared secret: rotating it broke the bank's receiver until both sides switched at once.
    With the new secret listed before the old one, a receiver still knowing only the old one and a
    receiver that already moved to the new one both accept; once the old one is removed from the
    configuration, a receiver left on it refuses (it must have moved by then)."""
    from services.common.runtime import Runtime
    from services.mfa.service import Orchestrator
    from services.serve import prepare

    on_old, on_new, on_both = Receiver(clock, secret=OLD), Receiver(clock, secret=NEW), Receiver(clock, [NEW, OLD])
    receivers = {TENANT: on_old, "bank-b": on_new, "bank-c": on_both}

    def deliver(secrets: list[str], phase: str) -> dict[str, bool]:
        settings = review_settings(tmp_path, storage_dsn, on_old.url, secret=None, secrets=secrets, tenants={
            "bank-b": {"url": on_new.url, "secrets": secrets}, "bank-c": {"url": on_both.url, "secrets": secrets}})
        prepare(settings)
        rt = Runtime.open(settings)
        o = Orchestrator(rt, clock=clock)
        try:
            for tenant in receivers:
                present(o.outbox.enqueue(tenant, "review.opened", {"review_id": f"rev_{phase}"}, clock()))
            assert o.outbox.deliver_due() == 3
        finally:
            o.close()
            rt.close()
        return {t: r.requests[-1]["verified"] for t, r in receivers.items()}

    try:
        assert deliver([NEW, OLD], "rotating") == {TENANT: True, "bank-b": True, "bank-c": True}
        assert deliver([NEW], "rotated") == {TENANT: False, "bank-b": True, "bank-c": True}
        assert [len(r.requests) for r in receivers.values()] == [2, 2, 2]
    finally:
        for r in receivers.values():
            r.close()


def test_webhook_secrets_are_checked_at_load_and_kept_out_of_reprs(tmp_path, monkeypatch):
    """The one secret was a plain string: the settings' repr (an exception's locals, a debug log of
    the configuration) showed it. A list of secrets that cannot sign (empty, an empty or short one,
    one repeated) is refused at load, naming the setting, never showing a secret."""
    from pydantic import ValidationError

    hook = {"url": "https://risk-ops.bank-a.example/hooks"}
    def shown(settings) -> list[str]:
        return [repr(settings), str(settings), settings.model_dump_json(), repr(settings.mfa.reviews.webhook)]

    settings = settings_for(tmp_path, "", reviews={"webhook": {**hook, "secret": OLD}})
    assert all(OLD[6:] not in text for text in shown(settings))
    assert settings.mfa.reviews.webhook.active_secrets == [OLD]  # the one secret of before: a list of one
    settings = settings_for(tmp_path, "", reviews={"webhook": {**hook, "secrets": [NEW, OLD],
                                                               "tenants": {"bank-b": {**hook, "secret": OLD}}}})
    assert settings.mfa.reviews.webhook.active_secrets == [NEW, OLD]
    assert all(NEW[6:] not in text and OLD[6:] not in text for text in shown(settings))
    for secrets, message in (([], "secrets list is empty"), ([NEW, ""], "secret #2 .* is empty"),
                             ([NEW, "short-secret"], "secret #2 .* shorter than 16"),
                             ([NEW, OLD, NEW], "secret #3 .* repeats an earlier one"),
                             ([f"{NEW}-{i}" for i in range(9)], "9 webhook secrets; at most 8")):
        with pytest.raises(ValidationError, match=message) as err:
            settings_for(tmp_path, "", reviews={"webhook": {**hook, "secrets": secrets}})
        assert NEW[6:] not in str(err.value) and "webhook" in str(err.value)
    with pytest.raises(ValidationError, match="not both") as err:
        settings_for(tmp_path, "", reviews={"webhook": {"tenants": {"bank-b": {**hook, "secret": OLD,
                                                                                "secrets": [NEW]}}}})
    assert "tenants.bank-b" in str(err.value) and OLD[6:] not in str(err.value)
    # from the environment, as the example configuration says: a JSON list
    monkeypatch.setenv("BIOGATE_MFA__REVIEWS__WEBHOOK__SECRETS", f'["{NEW}", "{OLD}"]')
    assert settings_for(tmp_path, "", reviews={"webhook": hook}).mfa.reviews.webhook.active_secrets == [NEW, OLD]


def test_bad_review_requests_are_refused_before_anything_is_written(served):
    settings, stubs = served
    _, review_id = under_review(stubs["dev-all"], settings)
    admin = stubs["dev-admin"]
    for call, req, code, field in (
            (admin.GetReview, F.GetReviewRequest(review_id=""), grpc.StatusCode.INVALID_ARGUMENT, "review_id"),
            (admin.GetReview, F.GetReviewRequest(review_id="rev_" + "0" * 32), grpc.StatusCode.NOT_FOUND, None),
            (admin.ResolveReview, F.ResolveReviewRequest(review_id=review_id, approve=True, note="x" * 1001),
             grpc.StatusCode.INVALID_ARGUMENT, "note")):
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == code, err.value
        if field:
            assert field in details_of(err.value)["fields"]
    assert admin.GetReview(F.GetReviewRequest(review_id=review_id)).review.status == "pending"


def test_each_bank_hears_only_of_its_own_reviews(tmp_path, storage_dsn, clock, receiver):
    """One URL served every tenant: in a deployment for several banks each bank's receiver was sent
    the others' review events (their decisions' tokens included). A tenant with a receiver of its own
    gets its events there, signed with its own secret; the others' go to the shared one."""
    from services.common.runtime import Runtime
    from services.mfa.service import Orchestrator
    from services.serve import prepare

    other = Receiver(clock, secret="another-bank-webhook-secret")
    try:
        settings = review_settings(tmp_path, storage_dsn, receiver.url,
                                   tenants={"bank-b": {"url": other.url, "secret": other.secret}})
        prepare(settings)
        rt = Runtime.open(settings)
        o = Orchestrator(rt, clock=clock)
        try:
            mine = present(o.outbox.enqueue(TENANT, "review.opened", {"review_id": "rev_a"}, clock()))
            theirs = present(o.outbox.enqueue("bank-b", "review.opened", {"review_id": "rev_b"}, clock()))
            assert o.outbox.deliver_due() == 2
        finally:
            o.close()
            rt.close()
        assert [(r["event_id"], r["verified"]) for r in receiver.requests] == [(mine.id, True)]
        assert [(r["event_id"], r["verified"]) for r in other.requests] == [(theirs.id, True)]
    finally:
        other.close()


def test_a_bank_whose_receiver_answers_garbage_holds_up_no_other_banks_events(tmp_path, storage_dsn, clock, receiver):
    """A receiver answering what is not HTTP made http.client's exception escape the worker's pass:
    the other banks' events behind it waited, and its own was never settled (retried for ever, no
    "abandoned" error). It is a failed attempt like any other."""
    from services.common.runtime import Runtime
    from services.mfa.service import Orchestrator
    from services.serve import prepare

    garbage = RawServer(lambda conn: conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))
    try:
        url = garbage.url
        settings = review_settings(tmp_path, storage_dsn, receiver.url,
                                   tenants={"bank-b": {"url": url, "secret": "another-bank-webhook-secret"}})
        prepare(settings)
        rt = Runtime.open(settings)
        o = Orchestrator(rt, clock=clock)
        try:
            theirs = present(o.outbox.enqueue("bank-b", "review.opened", {"review_id": "rev_b"}, clock()))
            clock.advance(0.001)
            mine = present(o.outbox.enqueue(TENANT, "review.opened", {"review_id": "rev_a"}, clock()))
            assert o.outbox.deliver_due() == 1
            assert [r["event_id"] for r in receiver.requests] == [mine.id]
            for wait in (5, 10):
                clock.advance(wait)
                o.outbox.deliver_due()
            rec = present(o.store.webhooks.get(theirs.id))
            assert (rec.attempts, rec.next_attempt_at, rec.delivered_at, rec.last_error) == \
                (3, None, None, "BadStatusLine")
        finally:
            o.close()
            rt.close()
    finally:
        garbage.close()


def test_a_bank_whose_receiver_never_answers_delays_other_banks_by_one_timeout_a_pass(tmp_path, storage_dsn, clock,
                                                                                      receiver):
    """The worker every bank shares waited out the timeout for each of a silent receiver's events
    before it reached another bank's: 50 events due, 50 timeouts (over 4 minutes at the default 5 s).
    The rest of a receiver's events after one that got no answer fail alike at once, unsent (what
    trying each would have given), and go on to their own backoff."""
    from services.common.runtime import Runtime
    from services.mfa.service import Orchestrator
    from services.serve import prepare

    silent = RawServer(lambda conn: silent.done.wait(30))  # reads the request, answers nothing
    try:
        url = silent.url
        settings = review_settings(tmp_path, storage_dsn, receiver.url, timeout_s=0.5,
                                   tenants={"bank-b": {"url": url, "secret": "another-bank-webhook-secret"}})
        prepare(settings)
        rt = Runtime.open(settings)
        o = Orchestrator(rt, clock=clock)
        try:
            theirs = []
            for i in range(4):
                theirs.append(present(o.outbox.enqueue("bank-b", "review.opened", {"review_id": f"rev_{i}"}, clock())))
                clock.advance(0.001)
            mine = present(o.outbox.enqueue(TENANT, "review.opened", {"review_id": "rev_a"}, clock()))
            assert o.outbox.deliver_due() == 1
            assert [r["event_id"] for r in receiver.requests] == [mine.id]
            assert silent.connections == 1  # one attempt waited out, not four
            recs = [present(o.store.webhooks.get(e.id)) for e in theirs]
            assert [r.last_error for r in recs] == ["TimeoutError"] + \
                ["not sent: TimeoutError on an earlier event this pass"] * 3
            assert {r.attempts for r in recs} == {1}
            assert {r.next_attempt_at for r in recs} == {clock() + timedelta(seconds=5)}
        finally:
            o.close()
            rt.close()
    finally:
        silent.close()


def test_a_webhook_without_its_secret_is_a_configuration_error(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="secret must be set"):
        settings_for(tmp_path, "", reviews={"webhook": {"url": "https://bank.example/hooks"}})
    with pytest.raises(ValidationError, match="http"):
        settings_for(tmp_path, "", reviews={"webhook": {"url": "ftp://bank.example", "secret": SECRET}})
    with pytest.raises(ValidationError, match="secret must be set"):
        settings_for(tmp_path, "", reviews={"webhook": {"tenants": {"bank-b": {"url": "https://b.example/hooks"}}}})


def test_reviews_stored_before_the_outcome_migration_keep_their_data(storage_dsn):
    """Migration 0004 widens the review statuses (SQLite rebuilds the table): a pending case kept
    from before comes through whole and can then be expired."""
    from datetime import datetime, timezone

    from services.common.storage import open_storage
    from services.mfa.storage import attach
    from tests.conftest import create_legacy_database

    create_legacy_database(storage_dsn)  # the review table as the old shared schema made it
    st = open_storage(storage_dsn)
    try:
        opened = datetime(2026, 1, 5, 9, 30, tzinfo=timezone.utc)
        with st.db.transaction() as s:
            s.execute("INSERT INTO mfa_reviews (id, tenant_id, subject_id, session_id, action, reasons, status,"
                      " created_at, resolved_at, resolved_by, note) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, NULL, '', '')",
                      ("rev_old", TENANT, "c1", "ses_old", "payment", [["RISK_REVIEW", "risk"]], opened))
        store = attach(st)
        old = present(store.reviews.get("rev_old"))
        assert (old.status, old.created_at, old.reasons, old.session_id) == (
            "pending", opened, (["RISK_REVIEW", "risk"],), "ses_old")
        assert [r.id for r in store.reviews.overdue(opened, 10)] == ["rev_old"]
        assert present(store.reviews.resolve("rev_old", "expired", "system", "", opened)).status == "expired"
    finally:
        st.close()


def test_an_event_committed_before_a_crash_is_delivered_by_the_next_process(tmp_path, storage_dsn, clock, receiver):
    from services.common.runtime import Runtime
    from services.common.server.bootstrap import RunningServer
    from services.mfa import subjects
    from services.mfa.server import definition
    from services.mfa.service import Orchestrator
    from services.serve import prepare

    settings = review_settings(tmp_path, storage_dsn, receiver.url)
    prepare(settings)
    rt = Runtime.open(settings)
    o = Orchestrator(rt, clock=clock)  # a process without its worker: it ends before delivering
    ref = common_pb2.SubjectRef(tenant_id=TENANT, subject_id="cust-crash")
    subjects.set_phone_number(rt, F.SetPhoneNumberRequest(subject=ref, phone_e164=PHONE), caller=SYSTEM)
    _, review_id = review_in_process(o, ref)
    o.close()
    rt.close()
    assert receiver.requests == [] and outbox_events(settings) == {"review.opened": 1}
    server = RunningServer(settings, definition(settings, clock=clock), port=0).start()
    try:
        receiver.wait_for(lambda r: [e["data"]["review_id"] for e in r.delivered()] == [review_id])
    finally:
        server.stop(grace=0)


def test_the_case_states_the_operating_point_that_decided_each_biometric(orch, tmp_path):
    """A face attempt as the face factor stores it (the models are not loaded here): the reviewer
    sees its LLR, binding, and target and measured FMR and APCER, as SubmitFactor answered them."""
    from services.mfa import subjects
    from services.mfa.fusion import FactorOutcome
    from services.mfa.reasons import Reason

    with_review_tenant(tmp_path)
    ref = common_pb2.SubjectRef(tenant_id=TENANT, subject_id="cust-op")
    subjects.set_phone_number(orch.rt, F.SetPhoneNumberRequest(subject=ref, phone_e164=PHONE), caller=SYSTEM)
    s = orch.start(F.StartAuthenticationRequest(subject=ref, channel=F.CHANNEL_APP, action="login",
                                                device=App().device,
                                                context=F.ContextSignals(conversation_text="AnyDesk please")), caller=SYSTEM)
    face = FactorOutcome("face", True, llr=4.25, liveness=True, reasons=(Reason("LIVENESS_PASSED", "passive"),),
                         binding="new_device", target_fmr=1e-4, measured_fmr=8.2e-5, target_apcer=0.05,
                         measured_apcer=0.081)
    orch.sessions.mutate(orch.sessions.get(s.session_id), lambda st: st.factors.append(face))
    orch.send_otp(F.SendOtpRequest(session_id=s.session_id), caller=SYSTEM)
    orch.submit(F.SubmitFactorRequest(session_id=s.session_id,
                                      otp=F.OtpEvidence(code=outbox_codes(orch.rt.settings)[-1])), caller=SYSTEM)
    d = orch.decide(F.DecideRequest(session_id=s.session_id), caller=SYSTEM)
    assert d.outcome == F.OUTCOME_REVIEW, d
    case = orch.get_review(F.GetReviewRequest(review_id=d.review_id))
    first, otp = case.factors
    assert (first.factor, first.passed, first.llr, first.binding) == (F.FACTOR_TYPE_FACE, True, 4.25, "new_device")
    assert [r.code for r in first.reasons] == ["LIVENESS_PASSED"]
    assert (first.target_fmr, first.measured_fmr) == pytest.approx((1e-4, 8.2e-5))
    assert (first.target_apcer, first.measured_apcer) == pytest.approx((0.05, 0.081))
    assert otp.factor == F.FACTOR_TYPE_SMS_OTP and otp.passed and not otp.HasField("target_fmr")
    assert case.decision.total_llr == pytest.approx(4.25 + 3.0) and list(case.decision.amr) == ["face", "sms", "mfa"]


def test_replicas_sharing_the_outbox_deliver_each_event_once(tmp_path, storage_dsn, clock, receiver):
    from services.common.runtime import Runtime
    from services.mfa.service import Orchestrator
    from services.serve import prepare

    settings = review_settings(tmp_path, storage_dsn, receiver.url)
    prepare(settings)
    replicas = [Orchestrator(Runtime.open(settings), clock=clock) for _ in range(2)]
    try:
        sent = [present(replicas[0].outbox.enqueue(TENANT, "review.opened", {"review_id": f"rev_{i}"}, clock())).id
                for i in range(6)]
        barrier = threading.Barrier(2)

        def drain(o) -> None:
            barrier.wait()
            o.outbox.deliver_due()
        threads = [threading.Thread(target=drain, args=(o,)) for o in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
        assert sorted(r["event_id"] for r in receiver.requests) == sorted(sent)  # each once, none lost
    finally:
        for o in replicas:
            o.close()
            o.rt.close()
