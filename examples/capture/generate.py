#!/usr/bin/env python3
"""Generates the shipped capture `wearables.jsonl` and its oracle `expected.json`.

Ten hours of traffic from 24 devices of four kinds (watches, blood-pressure cuffs, pulse
oximeters, step-counting bands), in the JSON Lines capture format `iomt replay` reads, with a
few poisoned events mixed in: bodies that are not JSON, watch readings without a time, and
thermometer readings whose type has no FHIR template. Deterministic: the same file every run.

`expected.json` is computed here, independently of iomt, from the data and the MedTech rules
(identifier = "{patient id}.{device id}.{type}.{window}", ids from SHA-256 as in Create
mode), so tests can check iomt's output against it.

Usage: python3 examples/capture/generate.py   (rewrites the two files next to this script)
"""
import hashlib
import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).parent
START = datetime(2026, 11, 20, 6, 0, 0, tzinfo=timezone.utc)
HOURS = 10
PARTITIONS = 4


def rid(system, value):
    return hashlib.sha256(f"{system}_{value}".encode()).hexdigest()


def iso(t):
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def compact(t):
    return t.strftime("%Y%m%d%H%M%S") + "Z"


def main():
    rnd = random.Random(20261120)
    events = []  # (enqueued time, device, body or raw text)
    expected = {}  # observation identifier value -> summary

    def observation(patient, device, type_name, segment, **summary):
        p, d = rid("", patient), rid("", device)
        key = f"{p}.{d}.{type_name}.{segment}"
        entry = expected.setdefault(key, {"type": type_name, "patient": p, "device": d, **summary})
        return entry

    def hour_segment(t):
        start = t.replace(minute=0, second=0, microsecond=0)
        end = start + timedelta(hours=1) - timedelta(microseconds=1)
        # MedTech's window end is start + 1 h - 1 tick; compact form has second precision.
        return f"{compact(start)}.{compact(end)}"

    # Watches: heart rate every 30 s, hourly SampledData.
    for w in range(8):
        device, patient = f"watch-{w:03d}", f"patient-{w:03d}"
        t = START + timedelta(seconds=rnd.randint(0, 29))
        while t < START + timedelta(hours=HOURS):
            hr = rnd.randint(55, 120)
            body = {"deviceId": device, "patientId": patient, "heartRate": hr,
                    "measuredAt": iso(t), "battery": round(rnd.random(), 2)}
            events.append((t + timedelta(milliseconds=rnd.randint(50, 900)), device, body))
            o = observation(patient, device, "heartrate", hour_segment(t), samples=0)
            o["samples"] += 1
            t += timedelta(seconds=30)
    # Oximeters: 3 to 5 samples every 2 minutes, hourly SampledData.
    for x in range(6):
        device, patient = f"oxi-{x:03d}", f"patient-{100 + x:03d}"
        t = START + timedelta(seconds=rnd.randint(0, 59))
        while t < START + timedelta(hours=HOURS):
            samples = []
            for i in range(rnd.randint(3, 5)):
                st = t + timedelta(seconds=i)
                samples.append({"t": int(st.timestamp()), "spo2": rnd.randint(90, 100),
                                "pr": rnd.randint(60, 100), "pi": round(rnd.uniform(1, 9), 1)})
                o = observation(patient, device, "spo2", hour_segment(st), samples=0)
                o["samples"] += 1
            body = {"sensor": device, "subject": patient, "model": "FingerOx 2", "samples": samples}
            events.append((t + timedelta(seconds=len(samples), milliseconds=rnd.randint(50, 900)), device, body))
            t += timedelta(minutes=2)
    # Cuffs: a reading every 30 minutes, one Observation per reading.
    for c in range(6):
        device, patient = f"bp-cuff-{c:03d}", f"patient-{200 + c:03d}"
        t = START + timedelta(minutes=rnd.randint(0, 29), seconds=rnd.randint(0, 59))
        while t < START + timedelta(hours=HOURS):
            sys_, dia = rnd.randint(100, 160), rnd.randint(60, 100)
            body = {"device": {"id": device, "model": "OmniBP 3"}, "patient": patient,
                    "reading": {"systolic": sys_, "diastolic": dia, "pulse": rnd.randint(55, 95)},
                    "takenAt": iso(t)}
            events.append((t + timedelta(milliseconds=rnd.randint(50, 900)), device, body))
            observation(patient, device, "bloodpressure", f"{compact(t)}.{compact(t)}",
                        systolic=sys_, diastolic=dia)
            t += timedelta(minutes=30)
    # Bands: a 15-minute activity summary per session, one Observation per session.
    for b in range(4):
        device, patient = f"band-{b:03d}", f"patient-{300 + b:03d}"
        t = START
        n = 0
        while t < START + timedelta(hours=HOURS):
            session = f"session-{b:03d}-{n:03d}"
            end = t + timedelta(minutes=15)
            steps = rnd.randint(0, 2000)
            body = {"deviceId": device, "userId": patient, "sessionId": session,
                    "activity": {"steps": steps, "distanceMeters": round(steps * 0.75, 1),
                                 "startDate": iso(t), "endDate": iso(end)}}
            events.append((end + timedelta(milliseconds=rnd.randint(50, 900)), device, body))
            observation(patient, device, "steps", session, steps=steps)
            t, n = end, n + 1
    # Poison: bodies that are not JSON.
    poison = []
    for i in range(5):
        t = START + timedelta(hours=1 + 2 * i, minutes=7)
        poison.append((t, f"watch-{i:03d}", f"HR={70 + i};ts={iso(t)}"))
    # Poison: watch readings without a time (IncompatibleData).
    for i in range(3):
        t = START + timedelta(hours=2 + 3 * i, minutes=13)
        poison.append((t, f"watch-{i:03d}", {"deviceId": f"watch-{i:03d}", "patientId": f"patient-{i:03d}", "heartRate": 77}))
    # Poison: thermometer readings, a type without a FHIR template (TemplateNotFound).
    for i in range(4):
        t = START + timedelta(hours=3, minutes=10 * i)
        poison.append((t, "thermo-001", {"probe": "thermo-001", "owner": "patient-400", "celsius": 36.6 + i / 10, "at": iso(t)}))
    # Matches no template: dropped, not an error (MedTech's DroppedEvent).
    for i in range(2):
        t = START + timedelta(hours=4, minutes=i)
        poison.append((t, "gateway-1", {"gateway": "gateway-1", "status": "online"}))
    events.extend(poison)
    events.sort(key=lambda e: (e[0], e[1]))

    sequence = [0] * PARTITIONS
    lines = []
    for enqueued, device, body in events:
        partition = int(hashlib.sha256(device.encode()).hexdigest(), 16) % PARTITIONS
        sequence[partition] += 1
        record = {"Partition": str(partition)}
        if isinstance(body, str):
            record["BodyText"] = body
        else:
            record["Body"] = body
        record["Properties"] = {}
        record["SystemProperties"] = {
            "x-opt-sequence-number": sequence[partition],
            "x-opt-enqueued-time": iso(enqueued),
            "iothub-connection-device-id": device,
        }
        lines.append(json.dumps(record, separators=(",", ":")))
    (HERE / "wearables.jsonl").write_text("\n".join(lines) + "\n")
    summary = {
        "events": len(lines),
        "devices": len({d for _, d, _ in events}),
        "deadLetters": {"InvalidDataFormatException": 5, "IncompatibleDataException": 3,
                        "TemplateNotFoundException": 4},
        "dropped": 2,
        "observations": expected,
    }
    (HERE / "expected.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(f"{len(lines)} events, {len(expected)} observations")


if __name__ == "__main__":
    main()
