#!/usr/bin/env python3
"""Reads the output of scripts/test.sh's cargo test runs and says how each test ended.

    scripts/lib/tally.py LOG            the closing summary over the whole log
    scripts/lib/tally.py --passed LOG   the names of the tests that passed, one per line

A test's result is the last one the log shows for it (a test binary that stalled or failed in
the nested harness runs again with only the tests that had not passed yet). A test that had
started when its run stalled, and has no result after, is "unfinished" and counts as failed.
Lines are libtest's: "test NAME ... ok|FAILED|ignored"; with --nocapture the result can come
on a line of its own after the test's output.
"""

import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\x1b[()][A-Z0-9]|[\x00-\x08\x0e-\x1f]")
START = re.compile(r"^test (\S+) \.\.\. ?(.*)$")
# "Running unittests src/lib.rs (target/debug/deps/rhyve_pci-0123abcd...)": every crate's unit
# tests are "unittests src/lib.rs", so the binary's crate name (less its hash) tells them apart.
RUNNING = re.compile(r"^\s*Running (.+?)(?: \((?:[^)]*/)?([A-Za-z0-9_]+?)(?:-[0-9a-f]+)?\))?$")
STALL = re.compile(r"^test: harness stall")
RERUN = re.compile(r"^test: harness rerun")
RETRY = re.compile(r"^harness: retry")
RESULTS = ("ok", "FAILED", "ignored")


def result_word(text):
    for word in RESULTS:
        if text == word or text.startswith(word + ",") or text.startswith(word + " "):
            return word
    return None


def tally(lines):
    results = {}  # (binary, test) -> last result
    binary = "?"
    pending = None
    unfinished = set()
    counts = {"stall": 0, "rerun": 0, "retry": 0}
    for raw in lines:
        line = ANSI.sub("", raw).rstrip("\r\n")
        m = RUNNING.match(line)
        if m:
            binary = m.group(1) + (f" [{m.group(2)}]" if m.group(2) else "")
            pending = None
            continue
        if STALL.match(line):
            counts["stall"] += 1
            if pending:
                unfinished.add(pending)
            pending = None
            continue
        if RERUN.match(line):
            counts["rerun"] += 1
            continue
        if RETRY.match(line):
            counts["retry"] += 1
            continue
        m = START.match(line)
        if m:
            key = (binary, m.group(1))
            word = result_word(m.group(2).strip())
            if word:
                results[key] = word
                unfinished.discard(key)
                pending = None
            else:
                pending = key
            continue
        word = result_word(line.strip())
        if pending and word and line.strip() in RESULTS:
            results[pending] = word
            unfinished.discard(pending)
            pending = None
    if pending:
        unfinished.add(pending)
    for key in unfinished:
        if results.get(key) != "ok":
            results[key] = "unfinished"
    return results, counts


def main():
    args = sys.argv[1:]
    only_passed = bool(args) and args[0] == "--passed"
    if only_passed:
        args = args[1:]
    if len(args) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8", errors="replace") as f:
        results, counts = tally(f)
    if only_passed:
        for (_, name), word in sorted(results.items()):
            if word == "ok":
                print(name)
        return 0
    by = {w: sorted(k for k, v in results.items() if v == w) for w in RESULTS + ("unfinished",)}
    for word in ("FAILED", "unfinished"):
        for binary, name in by[word]:
            print(f"tests: {word}: {name} ({binary})")
    failed = len(by["FAILED"]) + len(by["unfinished"])
    print(f"tests: {len(by['ok'])} passed, {failed} failed ({len(by['unfinished'])} of them "
          f"unfinished), {len(by['ignored'])} ignored (harness: {counts['stall']} stalls, "
          f"{counts['rerun']} reruns of failed tests; SMP ROM runs retried: {counts['retry']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
