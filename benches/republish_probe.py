"""Whether JetStream can make the coordinator's log phantom-free (BENCHMARKS.md, "What is
left"): a stream that takes records on <p>.log.<id>, stores them as <p>.events.<id> (a
subject transform) and republishes only what it stored to <p>.events.<id> (RePublish).

It checks, against a real nats-server, that
  1. a write refused for a wrong Nats-Expected-Last-Subject-Sequence never reaches core
     subscribers of <p>.events.* (today such a phantom does, which is why the coordinator
     reads the log before its first write and why a client may not trust a decision it
     sees on the bus);
  2. the expected sequence and Nats-Msg-Id apply to the stored subject, so fencing and
     idempotent writes work as they do now;
  3. history reads by <p>.events.<id> (direct get, last by subject) are unchanged;
  4. a core publish straight on <p>.events.<id> (a forgery) is not stored;
and, as the control, that with today's configuration the refused write does reach them.
Exits 1 if any of these does not hold. Usage: python benches/republish_probe.py NATS_URL
"""

import asyncio
import sys

import nats
from nats.js.api import RePublish, StreamConfig, SubjectTransform


async def main(url: str) -> int:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name="PROBE_EVENTS",
            subjects=["probe.log.*"],
            subject_transform=SubjectTransform(
                src="probe.log.*", dest="probe.events.{{wildcard(1)}}"
            ),
            republish=RePublish(src="probe.events.*", dest="probe.events.{{wildcard(1)}}"),
        )
    )
    seen = []

    async def on_event(msg):
        seen.append(msg.data.decode())

    await nc.subscribe("probe.events.*", cb=on_event)
    await nc.flush()
    problems = []

    def expect(seq: int) -> dict:
        return {"Nats-Expected-Last-Subject-Sequence": str(seq)}

    first = await js.publish("probe.log.t1", b"accepted", headers=expect(0))
    try:
        await js.publish("probe.log.t1", b"phantom-accepted", headers=expect(0))
        problems.append("a second first record was stored: the expected sequence is not applied")
    except nats.js.errors.BadRequestError as e:
        print(f"refused as it should be: {e.description}")
    nxt = await js.publish(
        "probe.log.t1", b"preparing", headers={**expect(first.seq), "Nats-Msg-Id": "t1.preparing"}
    )
    # A retry with the same id inside the duplicate window (with the expected sequence it is
    # refused for the sequence, as without a transform; the coordinator settles that by
    # reading the log).
    again = await js.publish("probe.log.t1", b"preparing", headers={"Nats-Msg-Id": "t1.preparing"})
    if not again.duplicate or again.seq != nxt.seq:
        problems.append(f"a retried write was not recognised as a duplicate: {again}")
    await nc.publish("probe.events.t1", b"forged")
    await nc.flush()
    await asyncio.sleep(0.5)
    if "phantom-accepted" in seen:
        problems.append("the refused write reached core subscribers")
    if seen.count("accepted") != 1 or seen.count("preparing") != 1:
        problems.append(f"core subscribers saw {seen}, expected each stored record once")
    last = await js.get_last_msg("PROBE_EVENTS", "probe.events.t1")
    if last.data != b"preparing":
        problems.append(f"last by subject probe.events.t1 is {last.data!r}")
    info = await js.stream_info("PROBE_EVENTS")
    if info.state.messages != 2:
        problems.append(f"{info.state.messages} messages stored, expected 2 (a forgery got in?)")
    # The control: today's configuration (records published on the subject they are
    # stored under). The refused write does reach core subscribers.
    await js.add_stream(StreamConfig(name="PROBE_TODAY", subjects=["today.events.*"]))
    today = []

    async def on_today(msg):
        today.append(msg.data.decode())

    await nc.subscribe("today.events.*", cb=on_today)
    await nc.flush()
    await js.publish("today.events.t1", b"accepted", headers=expect(0))
    try:
        await js.publish("today.events.t1", b"phantom-accepted", headers=expect(0))
    except nats.js.errors.BadRequestError:
        pass
    await asyncio.sleep(0.5)
    print(f"today's configuration: core subscribers saw {today}")
    if "phantom-accepted" not in today:
        problems.append("the control saw no phantom: the premise no longer holds")
    print(f"core subscribers saw: {seen}")
    print(f"stored: {info.state.messages}; last by subject probe.events.t1: {last.data.decode()}")
    await nc.close()
    for p in problems:
        print(f"PROBLEM: {p}")
    print("republish probe: " + ("FAILED" if problems else "every property holds"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1])))
