#!/usr/bin/env python3
"""A local AWS emulator for the tests: moto's backends served one request at a time.

    python3 .ci/moto-single.py [PORT] [HOST]     (default 127.0.0.1:5000)

`moto_server` serves each request on its own thread, and moto's TransactWriteItems is not
atomic under concurrent requests: two racing transactions on one aggregate can both win.
Serving one request at a time makes every request, a transaction included, atomic.
`POST /moto-api/reset` empties the emulator.

Cancelled transactions: moto 5.2 rolls them back correctly, by restoring a deep copy of
each table it takes before every TransactWriteItems. That copy costs time and memory in
the size of the table, and its copies of the items are never freed (moto keeps every model
instance it creates, for its reset): a few hundred transactions on a table of a thousand
items grow the process by gigabytes. So this wrapper replaces the whole-table copy with a
rollback of the items the transaction names: it keeps each of them (a copy of an item that
an Update changes in place) and the length of the table's stream, and puts them back when
the transaction fails. The result of a cancelled transaction is the same (nothing of it
stored, no stream record), checked by the DynamoDB store's tests.

Queries: moto 5.2 answers every Query by sorting all items of the table and then keeping
those of the asked key, so a query's cost grows with the whole table, which is most of the
DynamoDB suites' time. This wrapper hands a query on the table the items of its partition
alone, and a query on an index the items unsorted: moto sorts what it keeps in either case
(by range key, or by the index's keys), so the answer is the same.
"""

import copy
import sys

import moto.dynamodb.models as dynamodb_models
from moto.dynamodb.models import DynamoDBBackend
from moto.dynamodb.models.dynamo_type import DynamoType
from moto.dynamodb.models.table import Table
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server


class _TablesNotCopied:
    """`copy` as moto's DynamoDB backend sees it: a table is not copied, all else is."""

    @staticmethod
    def deepcopy(value, memo=None):
        if isinstance(value, Table):
            return value
        return copy.deepcopy(value, memo)


dynamodb_models.copy = _TablesNotCopied
_transact_write_items = DynamoDBBackend.transact_write_items


def _transact_write_items_with_item_rollback(self, transact_items):
    saved = []  # (table, hash key, range key, the item before)
    streams = {}  # id(table) -> (table, number of stream records before)
    for entry in transact_items:
        try:
            op_type, op = next(iter(entry.items()))
            table = self.get_table(op["TableName"])
            attributes = op["Item"] if op_type == "Put" else op["Key"]
            hash_key = DynamoType(attributes[table.hash_key_attr])
            range_key = (
                DynamoType(attributes[table.range_key_attr])
                if table.range_key_attr is not None
                else None
            )
            before = table.get_item(hash_key, range_key)
        except Exception:
            continue  # moto reports the malformed operation itself
        if op_type == "Update" and before is not None:
            before = copy.deepcopy(before)  # an Update changes the item in place
        saved.append((table, hash_key, range_key, before))
        if table.stream_shard is not None:
            streams.setdefault(id(table), (table, len(table.stream_shard.items)))
    try:
        return _transact_write_items(self, transact_items)
    except Exception:
        for table, hash_key, range_key, before in reversed(saved):
            if range_key is None:
                if before is None:
                    table.items.pop(hash_key, None)
                else:
                    table.items[hash_key] = before
            else:
                bucket = table.items[hash_key]
                if before is None:
                    bucket.pop(range_key, None)
                else:
                    bucket[range_key] = before
                if not bucket:
                    table.items.pop(hash_key, None)
        for table, length in streams.values():
            del table.stream_shard.items[length:]
        raise


DynamoDBBackend.transact_write_items = _transact_write_items_with_item_rollback

_query = Table.query


def _query_without_sorting_the_table(self, hash_key, *args, **kwargs):
    index_name = kwargs.get("index_name", args[6] if len(args) > 6 else None)

    def candidates():
        if index_name is None and hash_key is not None:
            partition = self.items.get(hash_key)
            if partition is None:
                return []
            return list(partition.values()) if self.range_key_attr else [partition]
        items = []
        for partition in self.items.values():
            items.extend(partition.values() if self.range_key_attr else [partition])
        return items

    self.all_items = candidates  # seen by this query alone: one request at a time
    try:
        return _query(self, hash_key, *args, **kwargs)
    finally:
        del self.all_items


Table.query = _query_without_sorting_the_table


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
