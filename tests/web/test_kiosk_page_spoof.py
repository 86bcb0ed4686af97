"""The kiosk page in headless Chromium, its camera playing a replay of the enrolled customer's face
on a phone screen (the liveness fixtures' spoof frames): passive liveness vetoes the face, the MFA
denies, and the page says so without asking for the SMS code."""

from __future__ import annotations

from tests.web.conftest import console_errors, open_page, screenshot, wait_state

CAMERA = ["face/pad/spoof/apfol_fake_0.png", "face/pad/spoof/apfol_fake_60.png"]  # replayed on a phone screen


def test_a_replayed_face_is_refused(browser, kiosk):
    assert open_page(browser, kiosk) == "ready", browser.find_element("id", "status").text
    browser.find_element("id", "customer").send_keys("cust-kiosk-spoofed")
    browser.find_element("id", "start").click()
    assert wait_state(browser, {"otp", "done", "error"}) == "done", browser.find_element("id", "status").text
    screenshot(browser, "kiosk-deny.png")
    assert browser.find_element("id", "outcome").get_attribute("data-outcome") == "DENY"
    codes = [li.get_attribute("data-code") for li in browser.find_elements("css selector", "#reasons li")]
    assert codes.count("LIVENESS_FAILED") == 1 and len(codes) == len(set(codes)), codes  # each reason once
    assert browser.find_element("id", "otp-form").get_attribute("hidden") is not None
    assert console_errors(browser) == []  # the page keeps to its content security policy
