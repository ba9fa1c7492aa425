#!/usr/bin/env python3
"""A txcoord participant in Python, written against the raw protocol with nats-py (no SDK).

The "ledger" service records a line for each committed transaction. It shows what any
language has to do to join a 2PC transaction:

1. Read commands through a JetStream durable consumer named after the service, on stream
   <PREFIX>_CMD, filtered on <prefix>.cmd.<service>.>, with explicit acks.
2. Keep one record per branch (<txn_id>.<step>) in a durable store (a KV bucket here), and
   write it *before* replying: the vote must survive a crash.
3. Reply with a JetStream publish to the command's reply_to, echoing the command's token,
   with Nats-Msg-Id = <txn_id>.<service>.<step>.<kind>.<attempt>.<token>, and ack the
   command only after the reply is stored.
4. Answer repeats from the record: a redelivered prepare gets the stored vote; commit after
   commit and abort after abort are no-ops; an abort before any prepare is recorded, so the
   late prepare votes abort.
5. Never apply a command that contradicts the record (commit without a ready vote, abort
   after commit): log it as a PROTOCOL VIOLATION and terminate the message.

bank.py beside this file is a fuller participant (SQLite, in-doubt resolution from the log).

Payload fields understood by prepare: "line" (text to record), "vote": "abort" with
"reason" (to refuse), "vote": "read_only".

Usage: ledger.py --nats-url nats://127.0.0.1:4222 [--service ledger] [--prefix txn]
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import time

import nats
from nats.js import api
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError


def now_ms():
    return int(time.time() * 1000)


class Violation(Exception):
    """A command that contradicts the branch's record."""


class Ledger:
    def __init__(self, js, kv, service):
        self.js = js
        self.kv = kv
        self.service = service

    async def load(self, key):
        """The branch record and its revision, or (None, None)."""
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None, None
        if entry.value is None or entry.operation in ("DEL", "PURGE"):
            return None, None
        return json.loads(entry.value), entry.revision

    async def store(self, key, record, revision):
        """Create (revision None) or compare-and-set; False when someone else wrote first."""
        body = json.dumps(record).encode()
        try:
            if revision is None:
                await self.kv.create(key, body)
            else:
                await self.kv.update(key, body, last=revision)
            return True
        except KeyWrongLastSequenceError:
            return False

    async def apply(self, cmd):
        """Applies one command durably; returns (outcome, reason) for the reply."""
        key = f"{cmd['txn_id']}.{cmd['step']}"
        for _ in range(16):
            rec, rev = await self.load(key)
            kind = cmd["kind"]
            if kind == "prepare":
                if rec is not None:
                    return vote_of(rec)
                payload = cmd.get("payload") or {}
                if cmd.get("deadline_ms", 0) and now_ms() > cmd["deadline_ms"]:
                    rec = {"state": "voted_abort", "reason": "prepare arrived after its deadline"}
                elif payload.get("vote") == "abort":
                    rec = {"state": "voted_abort", "reason": payload.get("reason", "ledger refused")}
                elif payload.get("vote") == "read_only":
                    rec = {"state": "read_only"}
                else:
                    rec = {"state": "prepared", "line": payload.get("line", "")}
                if await self.store(key, rec, None):
                    return vote_of(rec)
                continue
            if kind == "commit":
                if rec is None or rec["state"] not in ("prepared", "committed", "read_only"):
                    raise Violation(f"commit for branch {key} in state {rec}")
                if rec["state"] == "prepared":
                    # The effect (the ledger line) and the branch state change in one write.
                    rec = dict(rec, state="committed", committed_ms=now_ms())
                    if not await self.store(key, rec, rev):
                        continue
                return "done", None
            if kind == "abort":
                if rec is None:
                    if await self.store(key, {"state": "aborted_before_prepare"}, None):
                        return "done", None
                    continue
                if rec["state"] == "committed":
                    raise Violation(f"abort for committed branch {key}")
                if rec["state"] == "prepared":
                    if not await self.store(key, dict(rec, state="aborted"), rev):
                        continue
                return "done", None
            raise Violation(f"unknown command kind {kind!r}")
        raise RuntimeError(f"too many concurrent writers on {key}")

    async def handle(self, msg):
        try:
            cmd = json.loads(msg.data)
        except ValueError as e:
            print(f"malformed command on {msg.subject}: {e}", file=sys.stderr, flush=True)
            await msg.term()
            return
        try:
            outcome, reason = await self.apply(cmd)
            reply = {
                "txn_id": cmd["txn_id"],
                "service": self.service,
                "step": cmd["step"],
                "kind": cmd["kind"],
                "outcome": outcome,
                "attempt": cmd["attempt"],
            }
            if reason is not None:
                reply["reason"] = reason
            msg_id = f"{cmd['txn_id']}.{self.service}.{cmd['step']}.{cmd['kind']}.{cmd['attempt']}"
            # Echo the command's token: without it the coordinator refuses the reply.
            token = cmd.get("token")
            if token is not None:
                reply["token"] = token
                msg_id += f".{token}"
            await self.js.publish(cmd["reply_to"], json.dumps(reply).encode(), headers={"Nats-Msg-Id": msg_id})
            await msg.ack()
            print(f"{cmd['kind']} {cmd['txn_id']}/{cmd['step']}: {outcome}", file=sys.stderr, flush=True)
        except Violation as e:  # never applied, never confirmed, not redelivered
            print(f"PROTOCOL VIOLATION: {e}; not applied, not confirmed", file=sys.stderr, flush=True)
            await msg.term()
        except Exception as e:  # retried by redelivery
            print(f"command failed, will be retried: {e}", file=sys.stderr, flush=True)
            await msg.nak(delay=0.5)


def vote_of(rec):
    state = rec["state"]
    if state in ("prepared", "committed"):
        return "ready", None
    if state == "read_only":
        return "read_only", None
    if state == "voted_abort":
        return "abort", rec.get("reason")
    return "abort", "transaction already aborted"


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--service", default="ledger")
    # The identity `txcoord auth` generated for this service (the same variables as the
    # Rust services read); without them the connection is anonymous.
    parser.add_argument("--user", default=os.environ.get("TXCOORD_NATS__USER"))
    parser.add_argument("--password", default=os.environ.get("TXCOORD_NATS__PASSWORD"))
    parser.add_argument("--inbox-prefix", default=os.environ.get("TXCOORD_NATS__INBOX_PREFIX", "_INBOX"))
    parser.add_argument("--prefix", default="txn")
    args = parser.parse_args()

    nc = await nats.connect(args.nats_url, max_reconnect_attempts=-1,
                            user=args.user, password=args.password, inbox_prefix=args.inbox_prefix)
    js = nc.jetstream()
    stream = "".join(c.upper() if c.isalnum() else "_" for c in args.prefix) + "_CMD"
    # The coordinator creates the streams; wait for them rather than racing it.
    for _ in range(300):
        try:
            await js.stream_info(stream)
            break
        except NotFoundError:
            await asyncio.sleep(0.1)
    bucket = f"{args.service}_data"
    try:
        kv = await js.key_value(bucket)
    except Exception:
        kv = await js.create_key_value(bucket=bucket, history=1)
    config = api.ConsumerConfig(
        durable_name=args.service,
        filter_subject=f"{args.prefix}.cmd.{args.service}.>",
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=5,  # short: a command handed to a process that died waits this long (rule 1)
        deliver_policy=api.DeliverPolicy.ALL,
    )
    sub = await js.pull_subscribe(config.filter_subject, durable=args.service, stream=stream, config=config)
    ledger = Ledger(js, kv, args.service)
    print(f"participant ready service={args.service}", file=sys.stderr, flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set():
        try:
            msgs = await sub.fetch(batch=64, timeout=1)
        except (asyncio.TimeoutError, nats.errors.TimeoutError):
            continue
        except Exception as e:
            print(f"fetch failed, retrying: {e}", file=sys.stderr, flush=True)
            await asyncio.sleep(0.5)
            continue
        await asyncio.gather(*(ledger.handle(m) for m in msgs))
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
