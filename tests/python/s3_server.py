"""moto's S3-compatible server for the tests, one request at a time.

    s3_server.py PORT

moto checks `If-None-Match: *` and then stores the object as two steps; its own launcher
(`python -m moto.server`) serves requests on several threads, so two conditional creates of
one key that arrive together can both succeed (seen in the state tests under load). AWS S3
makes the check and the write one atomic step. Serving one request at a time gives the tests
that guarantee; scripts/start-s3.sh still checks that a second create is refused with 412.
"""

import os
import sys

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple


class Handler(MotoRequestHandler):
    # a client stopped in the middle of a request (the state tests SIGSTOP a process) must not
    # hold this one-request-at-a-time server: a connection silent this long is dropped (seen:
    # every other client timed out after 180 s)
    timeout = 10


def main():
    port = int(sys.argv[1])
    os.environ.setdefault("MOTO_PORT", str(port))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple("127.0.0.1", port, app, threaded=False, request_handler=Handler)


if __name__ == "__main__":
    main()
