#!/usr/bin/python3
"""A write oracle built on libnbd (a real NBD client we did not write).

write mode: write 4 KiB blocks in a loop, each carrying (seq, block) and a
pattern derived from them; append one JSON line per *acknowledged* write to
--out: {"seq", "block", "t", "uri"}. Every request has a timeout; on any error
the writer reconnects, to the current primary (asked from `metroctl volume
show`) or, with --pin, to the same URI forever (to catch a deposed primary
that still acknowledges: split brain).

--stop-file ends the run early (cleanly) once that file exists.

gaps mode: print the largest gap between consecutive acknowledged writes of
an ack log, and when it happened: {"acks", "max_gap_s", "at", "uris"}.

verify mode: read back every block named in the ack logs from --uri (or,
with --file, from a replica's data file on disk, e.g. to count what a power
cut lost) and check it holds the latest acknowledged write for that block,
or a later write that was attempted (never an older one, never garbage).
Exit 0 when every acknowledged write is present; 1 otherwise.
"""
import argparse, hashlib, json, os, struct, subprocess, sys, time
import nbd

BS = 4096


def pattern(seq, block):
    head = struct.pack(">QQ", seq, block)
    body = hashlib.sha256(head).digest() * ((BS - 16) // 32 + 1)
    return head + body[: BS - 16]


def primary_uri(args):
    if args.pin:
        return args.pin
    # Without --lab, metroctl finds the cluster from METRO_ENDPOINTS/METRO_CA/... (a deployed cluster).
    lab = ["--lab", args.lab] if args.lab else []
    out = subprocess.run([args.metroctl] + lab + ["-o", "json", "volume", "show", args.volume],
                         capture_output=True, text=True, timeout=15)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout).get("nbd")


def wait_done(h, cookie, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if h.aio_command_completed(cookie):
            return True
        h.poll(100)
    return False


def connect(uri):
    h = nbd.NBD()
    h.set_handshake_flags(h.get_handshake_flags())
    h.connect_uri(uri)
    return h


def write_mode(args):
    deadline = time.time() + args.seconds
    seq = args.seq_base
    h = None
    uri = None
    out = open(args.out, "a", buffering=1)
    errors = 0
    while time.time() < deadline and not (args.stop_file and os.path.exists(args.stop_file)):
        if h is None:
            try:
                uri = primary_uri(args)
                if not uri:
                    time.sleep(0.1)
                    continue
                h = connect(uri)
            except Exception as e:  # noqa: BLE001 - any connect failure means retry
                errors += 1
                h = None
                time.sleep(0.1)
                continue
        seq += 1
        block = args.first_block + (seq % args.blocks)
        try:
            cookie = h.aio_pwrite(pattern(seq, block), block * BS)
            if not wait_done(h, cookie, args.timeout):
                raise TimeoutError("write not acknowledged within %.1fs" % args.timeout)
            out.write(json.dumps({"seq": seq, "block": block, "t": time.time(), "uri": uri}) + "\n")
            if args.flush_every and seq % args.flush_every == 0:
                cookie = h.aio_flush()
                if not wait_done(h, cookie, args.timeout):
                    raise TimeoutError("flush not acknowledged")
        except Exception as e:  # noqa: BLE001
            errors += 1
            try:
                h.close() if hasattr(h, "close") else None
            except Exception:  # noqa: BLE001
                pass
            h = None
            time.sleep(0.05)
    print(json.dumps({"last_seq": seq, "errors": errors}))


def verify_mode(args):
    latest = {}
    attempted = {}
    for path in args.acks:
        for line in open(path):
            a = json.loads(line)
            b = a["block"]
            if a["seq"] > latest.get(b, -1):
                latest[b] = a["seq"]
    if args.file:
        f = open(args.file, "rb")

        def pread(b):
            f.seek(b * BS)
            return f.read(BS).ljust(BS, b"\0")
    else:
        h = connect(args.uri)

        def pread(b):
            return h.pread(BS, b * BS)
    bad = 0
    for b, seq in sorted(latest.items()):
        data = pread(b)
        got_seq, got_block = struct.unpack(">QQ", data[:16])
        if got_block != b or data != pattern(got_seq, got_block) or got_seq < seq:
            bad += 1
            if bad <= 10:
                print("block %d: expected seq >= %d, found seq %d block %d" % (b, seq, got_seq, got_block), file=sys.stderr)
    print(json.dumps({"blocks_checked": len(latest), "missing_or_wrong": bad}))
    return 1 if bad else 0


def gaps_mode(args):
    acks = [json.loads(line) for line in open(args.acks)]
    best, at = 0.0, None
    for a, b in zip(acks, acks[1:]):
        if b["t"] - a["t"] > best:
            best, at = b["t"] - a["t"], a["t"]
    print(json.dumps({"acks": len(acks), "max_gap_s": round(best, 3), "at": at,
                      "uris": sorted({a["uri"] for a in acks})}))
    return 0 if acks else 1


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("write")
    w.add_argument("--volume", required=True)
    w.add_argument("--lab", help="lab directory; without it metroctl uses METRO_* variables")
    w.add_argument("--metroctl", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--seconds", type=float, default=10)
    w.add_argument("--first-block", type=int, default=0)
    w.add_argument("--blocks", type=int, default=1024)
    w.add_argument("--seq-base", type=int, default=0)
    w.add_argument("--timeout", type=float, default=3.0)
    w.add_argument("--flush-every", type=int, default=16)
    w.add_argument("--pin")
    w.add_argument("--stop-file", help="stop (cleanly) as soon as this file exists")
    v = sub.add_parser("verify")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--uri")
    src.add_argument("--file", help="a volume's data file instead of an NBD export")
    v.add_argument("acks", nargs="+")
    g = sub.add_parser("gaps")
    g.add_argument("acks")
    args = p.parse_args()
    if args.mode == "gaps":
        return gaps_mode(args)
    if args.mode == "write":
        write_mode(args)
        return 0
    return verify_mode(args)


if __name__ == "__main__":
    sys.exit(main())
