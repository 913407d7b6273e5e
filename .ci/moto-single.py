#!/usr/bin/env python3
"""A local AWS emulator for the tests: moto's backends served one request at a time.

    python3 .ci/moto-single.py [PORT] [HOST]     (default 127.0.0.1:5000)

`moto_server` serves each request on its own thread, and moto's TransactWriteItems is not
atomic under concurrent requests: two racing transactions on one aggregate can both win.
Serving one request at a time makes every request, a transaction included, atomic.
`POST /moto-api/reset` empties the emulator.

moto 5.2 rolls a cancelled transaction back correctly (it restores a copy of each table it
took before applying any item; checked by tests of the DynamoDB store that cancel a
multi-item transaction and find nothing stored), so no workaround is needed here. It copies
the whole table per transaction, so transactions slow down as a table grows: the tests use
one small table each.
"""

import sys

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server


class QuietHandler(WSGIRequestHandler):
    def log_request(self, code="-", size="-"):
        pass


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(host, port, app, threaded=False, request_handler=QuietHandler)
    print(f"moto (one request at a time) on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
