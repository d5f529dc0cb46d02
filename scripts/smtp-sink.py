#!/usr/bin/env python3
"""A real SMTP server that stores every message it receives, for tests.

Usage: smtp-sink.py OUT_DIR [--host 127.0.0.1] [--port 0] [--auth USER:PASSWORD]

Listens with aiosmtpd (``pip install aiosmtpd``) and prints ``ready PORT`` on
stdout once it accepts connections (port 0 picks a free port, so there is no race
between choosing a port and binding it). Each accepted message N is saved as
``OUT_DIR/N.eml`` (the raw bytes) and ``OUT_DIR/N.json`` (the envelope plus the
message parsed by Python's ``email`` package: decoded subject, headers and text
body), both written before the server answers ``250``. With ``--auth`` the server
requires SMTP AUTH (PLAIN or LOGIN) with those credentials, over plain text, which
is acceptable only because it listens on localhost for tests.

Runs until killed.
"""

import argparse
import asyncio
import email
import email.policy
import itertools
import json
import logging
import os
import sys
import warnings

try:
    from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
except ImportError:
    sys.stderr.write("aiosmtpd is not installed: run `pip install aiosmtpd`\n")
    sys.exit(3)


class Sink:
    """aiosmtpd handler that saves each message into a directory."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.counter = itertools.count(1)

    async def handle_DATA(self, server, session, envelope):
        n = next(self.counter)
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        self._write(f"{n}.eml", raw)

        msg = email.message_from_bytes(raw, policy=email.policy.default)
        body = msg.get_body(preferencelist=("plain",))
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "subject": str(msg["Subject"]),
            "from": str(msg["From"]),
            "to": str(msg["To"]),
            "date": str(msg["Date"]),
            "message_id": str(msg["Message-ID"]),
            "content_type": msg.get_content_type(),
            "charset": msg.get_content_charset(),
            "text": body.get_content() if body is not None else None,
            "defects": [repr(d) for d in msg.defects],
        }
        # The JSON file is written last: its presence means the message is complete.
        self._write(f"{n}.json", json.dumps(record).encode("utf-8"))
        return "250 Message accepted for delivery"

    def _write(self, name, data):
        tmp = os.path.join(self.out_dir, "." + name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(self.out_dir, name))


def make_authenticator(user, password):
    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == user.encode()
            and auth_data.password == password.encode()
        )
        # handled=False: aiosmtpd itself answers 235 or 535.
        return AuthResult(success=ok, handled=False)

    return authenticator


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--auth", metavar="USER:PASSWORD")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    handler = Sink(args.out_dir)
    options = {}
    if args.auth:
        # Plain-text AUTH is deliberate here (localhost, tests); keep the log quiet.
        warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
        logging.getLogger("mail.log").setLevel(logging.ERROR)
        user, _, password = args.auth.partition(":")
        options = dict(
            auth_required=True,
            auth_require_tls=False,
            authenticator=make_authenticator(user, password),
        )

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="smtp-sink.test", enable_SMTPUTF8=True, **options),
        host=args.host,
        port=args.port,
    )
    port = server.sockets[0].getsockname()[1]
    print(f"ready {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
