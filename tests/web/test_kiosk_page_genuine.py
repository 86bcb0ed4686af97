"""The kiosk page in headless Chromium, its camera playing webcam frames of the enrolled customer
(other frames than the enrolment's): the face passes, the page asks for the SMS code, and the MFA
allows."""

from __future__ import annotations

from tests.web.conftest import console_errors, open_page, screenshot, wait_state

CAMERA = ["face/pad/live/apfol_real_40.png", "face/pad/live/apfol_real_80.png"]  # other frames than the enrolment's (apfol_real_0)


def test_a_genuine_face_and_the_sms_code_log_the_customer_in(browser, kiosk):
    assert open_page(browser, kiosk) == "ready", browser.find_element("id", "status").text
    assert "key=" not in browser.current_url  # the launcher's key left the address bar at once
    browser.find_element("id", "customer").send_keys("cust-kiosk-genuine")
    browser.find_element("id", "start").click()
    assert wait_state(browser, {"otp", "done", "error"}) == "otp", browser.find_element("id", "status").text
    assert browser.find_element("id", "outcome").get_attribute("data-outcome") == "STEP_UP"
    browser.find_element("id", "otp-code").send_keys(kiosk.sms_codes()[-1])
    browser.find_element("id", "otp-submit").click()
    assert wait_state(browser, {"done", "error", "otp"}) == "done", browser.find_element("id", "status").text
    outcome = browser.find_element("id", "outcome")
    shot = screenshot(browser, "kiosk-allow.png")
    assert outcome.get_attribute("data-outcome") == "ALLOW", (outcome.text, browser.find_element("id", "reasons").text)
    assert outcome.text == "Welcome" and shot.stat().st_size > 0
    assert console_errors(browser) == []  # the page keeps to its content security policy
