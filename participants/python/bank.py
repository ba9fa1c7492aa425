#!/usr/bin/env python3
"""A txcoord bank in Python, on the raw protocol with nats-py (no SDK), balances in SQLite.

It is the raw-protocol participant of `txcoord chaos`. Each account has a balance; a transfer
step is `debit {account, amount}` (prepare holds the money) or `credit {account, amount}`
(prepare records the incoming amount); commit moves the money, abort gives it back. The
branch record and the balance change are written in one SQLite transaction, committed
(synchronous=FULL) before the reply goes out: a SIGKILL at any point loses nothing.

It follows the six rules of the README's raw-protocol section:

1. a JetStream durable consumer named after the service, explicit acks;
2. one record per branch, written before the reply; repeats answered from it;
3. the reply is a JetStream publish that echoes the command's token, with Nats-Msg-Id
   <txn_id>.<service>.<step>.<kind>.<attempt>.<token>;
4. the command is acked only after the reply is stored;
5. a command that contradicts the branch's record (abort after commit, commit without a
   ready vote) is not applied, not confirmed, logged as PROTOCOL VIOLATION and terminated;
6. a branch prepared and not heard of for --in-doubt-after-ms reads the decision from the
   last record of <prefix>.events.<txn_id> and applies it; no decision means keep waiting.

Usage:
  bank.py --nats-url URL --service bank-py --db bank.sqlite [--seed ACCOUNT=AMOUNT ...]
  bank.py --db bank.sqlite --dump      # prints {"accounts": {...}, "branches": {...}} as JSON
"""

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import sys
import time

import nats
from nats.js import api
from nats.js.errors import NotFoundError


def now_ms():
    return int(time.time() * 1000)


def log(text):
    print(text, file=sys.stderr, flush=True)


class Violation(Exception):
    """A command that contradicts the branch's record (rule 5)."""


def open_db(path):
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS accounts ("
        " name TEXT PRIMARY KEY, balance INTEGER NOT NULL, held INTEGER NOT NULL DEFAULT 0,"
        " incoming INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS branches ("
        " key TEXT PRIMARY KEY, txn_id TEXT NOT NULL, state TEXT NOT NULL, action TEXT,"
        " account TEXT, amount INTEGER, reason TEXT, updated_ms INTEGER NOT NULL)"
    )
    return db


def parse_step(action, payload):
    """(action, account, amount) or a refusal text."""
    if action not in ("debit", "credit"):
        return f'unknown action {action!r}; a bank knows "debit" and "credit"'
    account, amount = payload.get("account"), payload.get("amount")
    if not isinstance(account, str) or not isinstance(amount, int) or isinstance(amount, bool) or amount < 1:
        return 'invalid payload: needs "account" (a string) and "amount" (a whole number, at least 1)'
    return action, account, amount


class Bank:
    def __init__(self, db, service):
        self.db = db
        self.service = service
        self.violations = 0

    def branch(self, key):
        row = self.db.execute(
            "SELECT state, action, account, amount, reason FROM branches WHERE key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        return dict(zip(("state", "action", "account", "amount", "reason"), row))

    def put_branch(self, key, txn_id, state, action=None, account=None, amount=None, reason=None):
        self.db.execute(
            "INSERT OR REPLACE INTO branches VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, txn_id, state, action, account, amount, reason, now_ms()),
        )

    def apply(self, cmd):
        """Applies one command in one SQLite transaction; returns (outcome, reason)."""
        key = f"{cmd['txn_id']}.{cmd['step']}"
        self.db.execute("BEGIN IMMEDIATE")
        try:
            result = self.decide(cmd, key)
            self.db.execute("COMMIT")
            return result
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def decide(self, cmd, key):
        rec = self.branch(key)
        kind, txn_id = cmd["kind"], cmd["txn_id"]
        if kind == "prepare":
            if rec is not None:
                return vote_of(rec)
            if cmd.get("deadline_ms", 0) and now_ms() > cmd["deadline_ms"]:
                self.put_branch(key, txn_id, "voted_abort", reason="prepare arrived after its deadline")
                return "abort", "prepare arrived after its deadline"
            step = parse_step(cmd.get("action", ""), cmd.get("payload") or {})
            if isinstance(step, str):
                self.put_branch(key, txn_id, "voted_abort", reason=step)
                return "abort", step
            action, account, amount = step
            row = self.db.execute("SELECT balance FROM accounts WHERE name = ?", (account,)).fetchone()
            refusal = None
            if row is None:
                refusal = f"unknown account: {account!r}"
            elif action == "debit" and row[0] < amount:
                refusal = f"insufficient funds: {account} has {row[0]}, debit is {amount}"
            if refusal is not None:
                self.put_branch(key, txn_id, "voted_abort", action, account, amount, refusal)
                return "abort", refusal
            if action == "debit":
                self.db.execute(
                    "UPDATE accounts SET balance = balance - ?, held = held + ? WHERE name = ?",
                    (amount, amount, account),
                )
            else:
                self.db.execute("UPDATE accounts SET incoming = incoming + ? WHERE name = ?", (amount, account))
            self.put_branch(key, txn_id, "prepared", action, account, amount)
            return "ready", None
        if kind == "commit":
            if rec is None or rec["state"] not in ("prepared", "committed"):
                raise Violation(f"commit for branch {key} in state {rec and rec['state']}")
            if rec["state"] == "prepared":
                self.settle(rec, True)
                self.put_branch(key, txn_id, "committed", rec["action"], rec["account"], rec["amount"])
            return "done", None
        if kind == "abort":
            if rec is None:
                self.put_branch(key, txn_id, "aborted_before_prepare")
                return "done", None
            if rec["state"] == "committed":
                raise Violation(f"abort for committed branch {key}")
            if rec["state"] == "prepared":
                self.settle(rec, False)
                self.put_branch(key, txn_id, "aborted", rec["action"], rec["account"], rec["amount"])
            return "done", None
        raise Violation(f"unknown command kind {kind!r} for branch {key}")

    def settle(self, rec, commit):
        amount, account = rec["amount"], rec["account"]
        if rec["action"] == "debit":
            back = 0 if commit else amount
            self.db.execute(
                "UPDATE accounts SET held = held - ?, balance = balance + ? WHERE name = ?",
                (amount, back, account),
            )
        else:
            gain = amount if commit else 0
            self.db.execute(
                "UPDATE accounts SET incoming = incoming - ?, balance = balance + ? WHERE name = ?",
                (amount, gain, account),
            )

    def in_doubt(self, older_than_ms):
        """Prepared branches not changed for older_than_ms: (key, txn_id, step)."""
        rows = self.db.execute(
            "SELECT key, txn_id FROM branches WHERE state = 'prepared' AND updated_ms < ?",
            (now_ms() - older_than_ms,),
        ).fetchall()
        return [(k, t, int(k.rsplit(".", 1)[1])) for k, t in rows]

    def dump(self):
        accounts = {
            n: {"balance": b, "held": h, "incoming": i}
            for n, b, h, i in self.db.execute("SELECT name, balance, held, incoming FROM accounts")
        }
        branches = {k: s for k, s in self.db.execute("SELECT key, state FROM branches")}
        return {"accounts": accounts, "branches": branches}


def vote_of(rec):
    state = rec["state"]
    if state in ("prepared", "committed"):
        return "ready", None
    if state == "voted_abort":
        return "abort", rec.get("reason")
    return "abort", "transaction already aborted"


class Runner:
    """The NATS side: commands in, replies out, in-doubt branches resolved from the log."""

    def __init__(self, js, bank, prefix):
        self.js = js
        self.bank = bank
        self.prefix = prefix
        self.events_stream = stream_name(prefix, "EVENTS")

    async def handle(self, msg):
        try:
            cmd = json.loads(msg.data)
            for field in ("txn_id", "step", "kind", "attempt", "reply_to"):
                if field not in cmd:
                    raise ValueError(f"missing field {field!r}")
        except ValueError as e:
            log(f"malformed command on {msg.subject}: {e}")
            await msg.term()
            return
        try:
            outcome, reason = self.bank.apply(cmd)
        except Violation as e:
            self.bank.violations += 1
            log(f"PROTOCOL VIOLATION: {e}; not applied, not confirmed (total {self.bank.violations})")
            await msg.term()
            return
        except Exception as e:  # a store failure: redelivery retries it
            log(f"command failed, will be retried: {e}")
            await msg.nak(delay=0.5)
            return
        reply = {
            "txn_id": cmd["txn_id"],
            "service": self.bank.service,
            "step": cmd["step"],
            "kind": cmd["kind"],
            "outcome": outcome,
            "attempt": cmd["attempt"],
        }
        if reason is not None:
            reply["reason"] = reason
        # Echo the command's token: without it the coordinator refuses the reply.
        token = cmd.get("token")
        if token is not None:
            reply["token"] = token
        msg_id = f"{cmd['txn_id']}.{self.bank.service}.{cmd['step']}.{cmd['kind']}.{cmd['attempt']}" + (f".{token}" if token else "")
        try:
            await self.js.publish(cmd["reply_to"], json.dumps(reply).encode(), headers={"Nats-Msg-Id": msg_id})
            await msg.ack()
        except Exception as e:
            log(f"reply not stored, will be redelivered: {e}")
            return

    async def resolve_in_doubt(self, after_ms, stop):
        """Rule 6: a prepared branch that heard nothing reads the decision from the log."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(after_ms / 2000, 0.5))
            except asyncio.TimeoutError:
                pass
            for key, txn_id, step in self.bank.in_doubt(after_ms):
                try:
                    last = await self.js.get_last_msg(self.events_stream, f"{self.prefix}.events.{txn_id}", direct=True)
                    state = json.loads(last.data).get("state")
                except Exception:
                    continue
                kind = {"committing": "commit", "committed": "commit", "aborting": "abort", "aborted": "abort"}.get(state)
                if kind is None:
                    continue
                try:
                    self.bank.apply({"txn_id": txn_id, "step": step, "kind": kind})
                    log(f"in-doubt branch {key} resolved from the log: {kind}")
                except Violation as e:
                    self.bank.violations += 1
                    log(f"PROTOCOL VIOLATION: {e} (from the log); not applied (total {self.bank.violations})")


def stream_name(prefix, kind):
    return "".join(c.upper() if c.isalnum() else "_" for c in prefix) + "_" + kind


def seed(db, seeds):
    for s in seeds:
        name, _, amount = s.partition("=")
        if not amount.isdigit():
            raise SystemExit(f"--seed {s!r}: expected ACCOUNT=AMOUNT with a whole number")
        db.execute("INSERT OR IGNORE INTO accounts (name, balance) VALUES (?, ?)", (name, int(amount)))


async def serve(args, bank):
    # One URL, or several (a cluster's nodes) separated by commas, as txcoord's --nats-url.
    servers = [u.strip() for u in args.nats_url.split(",") if u.strip()]
    nc = await nats.connect(servers, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                            user=args.user, password=args.password, inbox_prefix=args.inbox_prefix)
    js = nc.jetstream(timeout=2)
    stream = stream_name(args.prefix, "CMD")
    # The coordinator creates the streams; wait for them rather than racing it.
    for _ in range(600):
        try:
            await js.stream_info(stream)
            break
        except (NotFoundError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
            await asyncio.sleep(0.1)
    config = api.ConsumerConfig(
        durable_name=args.service,
        filter_subject=f"{args.prefix}.cmd.{args.service}.>",
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=5,  # short: a command handed to a process that died waits this long (rule 1)
        deliver_policy=api.DeliverPolicy.ALL,
    )
    while True:
        try:
            sub = await js.pull_subscribe(config.filter_subject, durable=args.service, stream=stream, config=config)
            break
        except Exception as e:
            log(f"cannot bind the durable consumer yet, retrying: {e}")
            await asyncio.sleep(0.5)
    runner = Runner(js, bank, args.prefix)
    log(f"participant ready service={args.service}")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    resolver = None
    if args.in_doubt_after_ms > 0:
        resolver = asyncio.create_task(runner.resolve_in_doubt(args.in_doubt_after_ms, stop))
    while not stop.is_set():
        try:
            msgs = await sub.fetch(batch=64, timeout=1)
        except (asyncio.TimeoutError, nats.errors.TimeoutError):
            continue
        except Exception as e:
            log(f"fetch failed, retrying: {e}")
            await asyncio.sleep(0.5)
            continue
        # One SQLite connection: commands are applied one after another.
        for m in msgs:
            await runner.handle(m)
    if resolver is not None:
        await resolver
    await nc.drain()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--service", default="bank-py")
    # The identity `txcoord auth` generated for this service (the same variables as the
    # Rust services read); without them the connection is anonymous.
    parser.add_argument("--user", default=os.environ.get("TXCOORD_NATS__USER"))
    parser.add_argument("--password", default=os.environ.get("TXCOORD_NATS__PASSWORD"))
    parser.add_argument("--inbox-prefix", default=os.environ.get("TXCOORD_NATS__INBOX_PREFIX", "_INBOX"))
    parser.add_argument("--prefix", default="txn")
    parser.add_argument("--db", required=True, help="the SQLite file")
    parser.add_argument("--seed", action="append", default=[], metavar="ACCOUNT=AMOUNT",
                        help="create an account if it does not exist (repeatable)")
    parser.add_argument("--in-doubt-after-ms", type=int, default=10000,
                        help="resolve a prepared branch from the log after this long (0: never)")
    parser.add_argument("--dump", action="store_true", help="print accounts and branch states as JSON and exit")
    args = parser.parse_args()
    db = open_db(args.db)
    bank = Bank(db, args.service)
    if args.dump:
        print(json.dumps(bank.dump()))
        return
    seed(db, args.seed)
    asyncio.run(serve(args, bank))


if __name__ == "__main__":
    main()
