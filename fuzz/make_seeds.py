#!/usr/bin/env python3
"""Writes the hand-made seed corpora of both fuzz targets (fuzz/README.md).

reply_parser seeds are reply files (core/tests/replies/README.md): a few good
replies here, plus every hostile reply of core/tests/replies copied as seed-<name>.
machine_inputs seeds are op sequences in the encoding of
core/tests/fuzz_harness/mod.rs (check_machine_stats). Re-run after changing it:
    python3 fuzz/make_seeds.py
Seed names must not start with a hex digit: .gitignore drops hash-named files.
"""
import os
import shutil

ROOT = os.path.dirname(os.path.abspath(__file__))
REPLIES = os.path.join(ROOT, "..", "core", "tests", "replies")
RP = os.path.join(ROOT, "corpus", "reply_parser")
MI = os.path.join(ROOT, "corpus", "machine_inputs")

def write(d, name, data):
    assert name.startswith("seed-")
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

# ---------------------------------------------------------------- reply_parser
os.makedirs(RP, exist_ok=True)
good = {
    "seed-good-intuit-rotated": b'200\nintuit_tid: 1-abc\n\n{"access_token":"eyJlbmMiOiJBMTI4Q0JDLUhTMjU2IiwiYWxnIjoiZGlyIn0..abc","refresh_token":"AB11795839062yGqrfMhMwqCtO6gBgg9qeSp6Gy0jsgvmdvK8W","token_type":"bearer","expires_in":3600,"x_refresh_token_expires_in":8726400}',
    "seed-good-intuit-hard-expiry": b'200\n\n{"access_token":"AT-1","refresh_token":"RT-2","token_type":"bearer","expires_in":3600,"x_refresh_token_expires_in":8726400,"x_refresh_token_hard_expires_in":157680000}',
    "seed-good-no-refresh-token": b'200\n\n{"access_token":"AT-1","token_type":"Bearer","expires_in":3599}',
    "seed-good-no-expires-in": b'200\n\n{"access_token":"AT-1","refresh_token":"RT-2"}',
    "seed-good-digit-string-lifetimes": b'200\n\n{"access_token":"AT-1","token_type":"bearer","expires_in":"3600","x_refresh_token_expires_in":"8726400"}',
    "seed-good-github": b'200\n\n{"access_token":"ghu_16C7e42F292c6912E7710c838347Ae178B4a","expires_in":28800,"refresh_token":"ghr_1B4a2e77838347a7E420ce178F2E7c6912E169246c34E1ccbF66C46812d16D5B1A9Dc86A1498","refresh_token_expires_in":15811200,"scope":"","token_type":"bearer"}',
    "seed-good-null-fields": b'200\n\n{"access_token":"AT-1","refresh_token":null,"expires_in":null,"token_type":null,"id_token":"eyJ.eyJ.sig"}',
    "seed-revoke-200-empty": b'200\n\n',
    "seed-revoke-503": b'503\nretry-after: 30\n\n',
}
for name, data in good.items():
    write(RP, name, data)
for f in sorted(os.listdir(REPLIES)):
    if f.endswith(".reply"):
        shutil.copyfile(os.path.join(REPLIES, f), os.path.join(RP, "seed-" + f[: -len(".reply")]))

# -------------------------------------------------------------- machine_inputs
os.makedirs(MI, exist_ok=True)
# profiles
INTUIT, XERO, GITHUB, STRICT = 0, 1, 2, 3
# setup byte: bit0 second worker, bit1 second worker sandbox, bits2-4 record variant
def setup(two=False, sandbox=False, variant=1):
    return (1 if two else 0) | (2 if sandbox else 0) | (variant << 2)
NONE, EXPIRED, VALID, DEGRADED, REAUTH, IN_DOUBT, SANDBOX_RECORD, NEAR_DEADLINES = range(8)
# ops for worker w: op + 16 * w
REQ, ANSWER, MAINTAIN, STORE_FAILED, REPLY, UNSENT_OR_UNKNOWN, TIMEOUT, ADVANCE = 0, 2, 3, 4, 5, 7, 8, 9
STORE_CHANGED, FOREIGN, DISCONNECT, AUTHORIZED, DRIVER_BUG, STALE = 10, 11, 12, 13, 14, 15
# reply kinds (byte after REPLY)
ROTATING, NO_REFRESH, ECHO, INVALID_GRANT, HTML_503, RATE_LIMITED, INVALID_CLIENT, ARBITRARY = range(8)
# advance steps (byte after ADVANCE): index into STEPS
S0, S400MS, S5, S31, S61, M5, M56, H1, H25, D31, D71, Y2 = range(12)
STATUS = {200: 0, 201: 1, 204: 2, 301: 3, 400: 4, 401: 5, 403: 6, 404: 7, 408: 8, 429: 9, 500: 10, 502: 11, 503: 12, 100: 13, 0: 14, 999: 15}

def w(op, worker=0):
    return op + 16 * worker

def refresh(reply=(REPLY, ROTATING), worker=0):
    """request, load, lease, reply, commit"""
    return [w(REQ, worker), w(ANSWER, worker), w(ANSWER, worker), w(reply[0], worker), *reply[1:], w(ANSWER, worker)]

def arbitrary(status, body):
    assert len(body) < 256
    return [REPLY, ARBITRARY, STATUS[status], len(body), *body]

seeds = {
    "seed-refresh-rotated-intuit": [INTUIT, setup(), *refresh()],
    "seed-refresh-without-refresh-token": [INTUIT, setup(), *refresh((REPLY, NO_REFRESH))],
    "seed-refresh-echoed-refresh-token": [INTUIT, setup(), *refresh((REPLY, ECHO))],
    "seed-refresh-then-cached-serve": [INTUIT, setup(), *refresh(), REQ, ADVANCE, M5, REQ],
    "seed-no-serve-inside-the-margin": [INTUIT, setup(), *refresh(), ADVANCE, M56, REQ, ANSWER, ANSWER, REPLY, ROTATING, ANSWER],
    "seed-invalid-grant-reread-reauth": [INTUIT, setup(), *refresh((REPLY, INVALID_GRANT)), ANSWER, REQ],
    "seed-invalid-grant-after-foreign-rotation": [INTUIT, setup(), REQ, ANSWER, ANSWER, FOREIGN, 0, REPLY, INVALID_GRANT, ANSWER, REQ, ANSWER],
    "seed-html-503-then-retry": [INTUIT, setup(), *refresh((REPLY, HTML_503)), TIMEOUT, ANSWER, ANSWER, REPLY, ROTATING, ANSWER],
    "seed-429-retry-after-then-retry": [INTUIT, setup(), *refresh((REPLY, RATE_LIMITED, 1)), TIMEOUT, ANSWER, ANSWER, REPLY, ROTATING, ANSWER],
    "seed-invalid-client-config-error": [INTUIT, setup(), *refresh((REPLY, INVALID_CLIENT)), REQ],
    "seed-arbitrary-html-502": [INTUIT, setup(), REQ, ANSWER, ANSWER, *arbitrary(502, b"<html><h1>502 Bad Gateway</h1></html>"), ANSWER],
    "seed-arbitrary-truncated-200": [INTUIT, setup(), REQ, ANSWER, ANSWER, *arbitrary(200, b'{"access_token":"atSECRET-9","refresh_tok'), ANSWER, TIMEOUT, ANSWER, ANSWER],
    "seed-arbitrary-good-200": [INTUIT, setup(), REQ, ANSWER, ANSWER, *arbitrary(200, b'{"access_token":"AT-arbitrary","refresh_token":"RT-arbitrary","expires_in":3600}'), ANSWER, REQ],
    "seed-arbitrary-github-200-error": [GITHUB, setup(), REQ, ANSWER, ANSWER, *arbitrary(200, b'{"error":"bad_refresh_token"}'), ANSWER, ANSWER],
    "seed-outcome-unknown-then-retry": [INTUIT, setup(), REQ, ANSWER, ANSWER, UNSENT_OR_UNKNOWN, 1, ANSWER, TIMEOUT, ANSWER, ANSWER, REPLY, ROTATING, ANSWER],
    "seed-not-sent-then-retry": [INTUIT, setup(), REQ, ANSWER, ANSWER, UNSENT_OR_UNKNOWN, 0, ANSWER, TIMEOUT, ANSWER, ANSWER, REPLY, ROTATING, ANSWER],
    "seed-outcome-unknown-strict-declares-lost": [STRICT, setup(), REQ, ANSWER, ANSWER, UNSENT_OR_UNKNOWN, 1, ANSWER, REQ],
    "seed-in-doubt-record-strict": [STRICT, setup(variant=IN_DOUBT), *refresh(), REQ],
    "seed-in-doubt-record-intuit": [INTUIT, setup(variant=IN_DOUBT), *refresh(), REQ],
    "seed-xero-rotation-twice": [XERO, setup(), *refresh(), ADVANCE, H1, *refresh()],
    "seed-github-rotation": [GITHUB, setup(), *refresh(), ADVANCE, Y2, REQ, ANSWER, ANSWER],
    "seed-valid-access-served-from-cache": [INTUIT, setup(variant=VALID), REQ, ANSWER, REQ],
    "seed-degraded-record-holds-off": [INTUIT, setup(variant=DEGRADED), REQ, ANSWER, TIMEOUT, ANSWER, ANSWER, REPLY, ROTATING, ANSWER],
    "seed-reauth-record-answers-callers": [INTUIT, setup(variant=REAUTH), REQ, ANSWER, ADVANCE, S5, REQ, ANSWER],
    "seed-sandbox-record-refused-before-sending": [INTUIT, setup(variant=SANDBOX_RECORD), REQ, ANSWER, ANSWER, ANSWER, REQ, ANSWER, ANSWER, ANSWER],
    "seed-keepalive-and-reconnect-soon": [INTUIT, setup(variant=NEAR_DEADLINES), *refresh(), ADVANCE, D71, TIMEOUT, ANSWER, ANSWER, REPLY, ROTATING, ANSWER, TIMEOUT],
    "seed-no-record-not-connected": [INTUIT, setup(variant=NONE), REQ, ANSWER],
    "seed-authorize-then-refresh": [INTUIT, setup(variant=NONE), AUTHORIZED, 1, ANSWER, ANSWER, ADVANCE, H1, *refresh()],
    "seed-authorize-without-refresh-token": [INTUIT, setup(variant=NONE), AUTHORIZED, 0, REQ, ANSWER],
    "seed-disconnect-revokes": [INTUIT, setup(), DISCONNECT, ANSWER, REPLY, ROTATING, ANSWER, REQ],
    "seed-disconnect-revoke-fails": [INTUIT, setup(), DISCONNECT, ANSWER, REPLY, HTML_503, ANSWER],
    "seed-store-failed-on-load-then-retry": [INTUIT, setup(), REQ, STORE_FAILED, ANSWER, ADVANCE, S5, TIMEOUT, ANSWER, ANSWER, REPLY, ROTATING, ANSWER],
    "seed-store-failed-on-commit-serves-fresh-token": [INTUIT, setup(), REQ, ANSWER, ANSWER, REPLY, ROTATING, STORE_FAILED, REQ, ADVANCE, S5, TIMEOUT, ANSWER],
    "seed-store-failed-on-lease": [INTUIT, setup(), REQ, ANSWER, STORE_FAILED, ADVANCE, S5, TIMEOUT, ANSWER, ANSWER],
    "seed-store-changed-while-waiting": [INTUIT, setup(), REQ, ANSWER, FOREIGN, 4, 30, ANSWER, STORE_CHANGED, FOREIGN, 0, TIMEOUT, ANSWER, REQ],
    "seed-foreign-rotation-conflict": [INTUIT, setup(), REQ, ANSWER, ANSWER, REPLY, ROTATING, FOREIGN, 0, ANSWER, REQ],
    "seed-foreign-reauth-then-late-commit": [INTUIT, setup(), REQ, ANSWER, ANSWER, REPLY, ROTATING, FOREIGN, 1, ANSWER, ANSWER, REQ],
    "seed-foreign-disconnect-then-commit": [INTUIT, setup(), REQ, ANSWER, ANSWER, REPLY, ROTATING, FOREIGN, 2, ANSWER, REQ, ANSWER],
    "seed-driver-bugs-in-every-phase": [INTUIT, setup(), DRIVER_BUG, 0, DRIVER_BUG, 1, REQ, DRIVER_BUG, 0, DRIVER_BUG, 3, ANSWER, DRIVER_BUG, 2, ANSWER, DRIVER_BUG, 1, REPLY, ROTATING, DRIVER_BUG, 2, ANSWER, DRIVER_BUG, 4, DRIVER_BUG, 5],
    "seed-stale-replica-read": [INTUIT, setup(), *refresh(), ADVANCE, H1, REQ, STALE, 0, ANSWER, REPLY, ROTATING, ANSWER, REQ],
    "seed-two-workers-one-refreshes": [INTUIT, setup(two=True), REQ, w(REQ, 1), ANSWER, w(ANSWER, 1), ANSWER, w(ANSWER, 1), REPLY, ROTATING, ANSWER, w(TIMEOUT, 1), w(ANSWER, 1), w(REQ, 1)],
    "seed-two-workers-both-load-then-race": [INTUIT, setup(two=True), REQ, w(REQ, 1), ANSWER, w(ANSWER, 1), ANSWER, REPLY, ROTATING, w(ANSWER, 1), ANSWER, w(ANSWER, 1)],
    "seed-two-workers-paused-lease-holder": [INTUIT, setup(two=True), REQ, ANSWER, ANSWER, ADVANCE, S61, w(REQ, 1), w(ANSWER, 1), w(ANSWER, 1), w(ANSWER, 1), w(REPLY, 1), ROTATING, w(ANSWER, 1), REPLY, ROTATING, ANSWER, ANSWER, REQ],
    "seed-two-workers-paused-holder-strict": [STRICT, setup(two=True), REQ, ANSWER, ANSWER, ADVANCE, S61, w(REQ, 1), w(ANSWER, 1), w(ANSWER, 1), w(ANSWER, 1), REPLY, ROTATING, ANSWER, ANSWER, w(REQ, 1), w(ANSWER, 1)],
    "seed-two-workers-invalid-grant-after-other-committed": [INTUIT, setup(two=True), REQ, ANSWER, ANSWER, ADVANCE, S61, w(REQ, 1), w(ANSWER, 1), w(ANSWER, 1), w(REPLY, 1), ROTATING, w(ANSWER, 1), REPLY, INVALID_GRANT, ANSWER, REQ],
    "seed-two-workers-sandbox-credentials-refused": [INTUIT, setup(two=True, sandbox=True), w(REQ, 1), w(ANSWER, 1), w(ANSWER, 1), w(ANSWER, 1), REQ, ANSWER, ANSWER, REPLY, ROTATING, ANSWER, w(REQ, 1), w(ANSWER, 1), w(ANSWER, 1), w(ANSWER, 1)],
    "seed-two-workers-sandbox-authorizes-over-production": [INTUIT, setup(two=True, sandbox=True, variant=NONE), w(AUTHORIZED, 1), 1, w(ANSWER, 1), w(ANSWER, 1), REQ, ANSWER, ANSWER, ANSWER],
    "seed-maintain-keepalive-with-valid-access": [INTUIT, setup(variant=VALID), REQ, ANSWER, MAINTAIN, ANSWER, ANSWER, REPLY, ROTATING, ANSWER, REQ],
    "seed-maintain-after-abandoned-lease": [INTUIT, setup(two=True), REQ, ANSWER, ANSWER, ADVANCE, S61, w(MAINTAIN, 1), w(ANSWER, 1), w(ANSWER, 1), w(ANSWER, 1), w(REPLY, 1), ECHO, w(ANSWER, 1), REPLY, ROTATING, ANSWER, ANSWER],
    "seed-long-idle-then-expired": [INTUIT, setup(), *refresh(), ADVANCE, D71, ADVANCE, D71, REQ, ANSWER, ANSWER, REPLY, INVALID_GRANT, ANSWER, ANSWER],
}
for name, ops in seeds.items():
    write(MI, name, bytes(ops))
print(len(os.listdir(RP)), "reply_parser seeds,", len(os.listdir(MI)), "machine_inputs seeds")
