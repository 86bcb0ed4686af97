"""A face + SMS-code login with the SDK, as in the README: python clients/python/examples/login.py SELFIE"""
import sys

from biogate_client import BioGate, Device, dev_otp

bg = BioGate.development()                                    # 127.0.0.1:50051-3, var/dev-credentials.json
phone = Device()                                              # the app's key (Device.load(path) keeps one)
s = bg.start("bank-a", "cust-0001", phone)                    # a login session on this phone
print(s.submit_face(open(sys.argv[1], "rb").read()).passed)   # the selfie, signed by the phone
sent = s.send_otp()                                           # a new phone: the SMS code too
s.submit_otp(dev_otp("var/sms-outbox.jsonl", sent.masked_phone))  # development sink; else what the user types
d = s.decide()
print(bg.verify_token(d.token, "bank-a", session_id=s.id))    # signature (JWKS), audience, expiry, session
