"""The kiosk gateway: a REST/JSON front of the MFA's face-login flow for a bank's kiosk browser
(services/kiosk/gateway.py), and the page it serves (services/kiosk/static/)."""
