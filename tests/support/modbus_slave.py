#!/usr/bin/env python3
"""Scriptable Modbus RTU slave (server) for hvac-edge integration tests and benchmarks.

Serves holding (fc 3/6/16) and input (fc 4) registers for several unit ids on
one serial port (typically one end of a socat pty pair), 8N1, all registers 0
at start.  Register addresses are raw 0-based PDU addresses: after
`set 1 ir 1002 7` a client reading fc 4, address 1002 gets 7.

Controlled over stdin, one command per line; each is answered with exactly one
line on stdout (`ok ...` or `err <text>`), flushed:

    set <unit> <ir|hr> <addr> <v1> [v2 ...]   set consecutive u16 values
    get <unit> <ir|hr> <addr> [count]         -> `ok v1 v2 ...` (e.g. check fc 6/16 writes)
    mute <unit> / unmute <unit>               unit stops / resumes answering (silence on the wire)
    crc <unit> <n>                            next n responses of unit get a corrupted CRC
    stats                                     -> `ok {"1": 12, "2": 10}` requests received per unit
    quit                                      exit 0 (EOF on stdin also exits 0)

Prints `ready` once the port is open and served.  Exit codes: 0 quit/EOF,
2 port cannot be opened / bad arguments, 3 port lost while running (e.g. socat died).
Requires pymodbus==3.11.4 and pyserial.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading

from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer

log = logging.getLogger("modbus_slave")
MAX_UNITS = 32


class RawAddressContext(ModbusDeviceContext):
    """ModbusDeviceContext minus its `address += 1` in getValues/setValues (pymodbus quirk:
    with a block at 0, PDU address 1002 would hit block index 1003). PDU address N = index N."""

    def getValues(self, func_code, address, count=1):
        return self.store[self.decode(func_code)].getValues(address, count)

    def setValues(self, func_code, address, values):
        return self.store[self.decode(func_code)].setValues(address, values)


class Slave:
    """Register tables plus the fault-injection state, shared with the server hooks."""

    def __init__(self, units: list[int], size: int):
        self.size = size
        self.devices = {
            u: RawAddressContext(
                ir=ModbusSequentialDataBlock(0, [0] * size),
                hr=ModbusSequentialDataBlock(0, [0] * size),
            )
            for u in units
        }
        self.muted: set[int] = set()
        self.crc_left: dict[int, int] = {}
        self.requests: dict[int, int] = {u: 0 for u in units}
        self.connected = self.closing = False
        self.exit_code = 0
        loop = asyncio.get_running_loop()
        self.ready, self.done = loop.create_future(), loop.create_future()

    # --- pymodbus hooks (called in the event loop for every frame) -------------
    def trace_pdu(self, sending: bool, pdu):
        """Count incoming requests; drop those to muted units.  The server keeps our
        return value as `last_pdu` and answers only `if self.last_pdu`: None = silence."""
        if not sending:
            self.requests[pdu.dev_id] = self.requests.get(pdu.dev_id, 0) + 1
            if pdu.dev_id in self.muted:
                log.debug("unit %d muted, dropping fc %d", pdu.dev_id, pdu.function_code)
                return None
        return pdu

    def trace_packet(self, sending: bool, data: bytes) -> bytes:
        """Corrupt the CRC (flip all bits of the last byte) of outgoing frames on demand."""
        if sending and data and self.crc_left.get(data[0], 0) > 0:
            self.crc_left[data[0]] -= 1
            log.debug("unit %d: corrupting CRC of %s", data[0], data.hex())
            return data[:-1] + bytes([data[-1] ^ 0xFF])
        return data

    def trace_connect(self, connected: bool) -> None:
        if connected:
            self.connected = True
            if not self.ready.done():
                self.ready.set_result(None)
        elif self.connected and not self.closing:
            # The serial transport closed itself (read/write error, e.g. the pty
            # peer went away).  pymodbus would then sit idle forever: exit instead.
            log.error("serial port lost, exiting with status 3")
            self.finish(3)

    def finish(self, code: int) -> None:
        self.exit_code = code
        if self.done and not self.done.done():
            self.done.set_result(None)

    # --- stdin commands --------------------------------------------------------
    def command(self, line: str) -> str:
        words = line.split()
        if not words:
            return "err empty command"
        cmd, args = words[0].lower(), words[1:]
        try:
            if cmd in ("set", "get"):
                unit, table, addr = self.unit(args[0]), args[1].lower(), int(args[2], 0)
                if table not in ("ir", "hr"):
                    return f"err unknown table {table!r} (want ir or hr)"
                block = self.devices[unit].store[table[0]]
                if cmd == "get":
                    count = int(args[3], 0) if len(args) > 3 else 1
                    if addr < 0 or count < 1 or addr + count > self.size:
                        return "err address out of range"
                    return "ok " + " ".join(map(str, block.getValues(addr, count)))
                values = [int(v, 0) for v in args[3:]]
                if not values:
                    return "err no values"
                if any(not 0 <= v <= 0xFFFF for v in values):
                    return "err value out of range 0..65535"
                if addr < 0 or addr + len(values) > self.size:
                    return "err address out of range"
                block.setValues(addr, values)
            elif cmd == "mute":
                self.muted.add(self.unit(args[0]))
            elif cmd == "unmute":
                self.muted.discard(self.unit(args[0]))
            elif cmd == "crc":
                unit, count = self.unit(args[0]), int(args[1])
                if count < 0:
                    return "err count must be >= 0"
                self.crc_left[unit] = count
            elif cmd == "stats":
                return "ok " + json.dumps({str(u): n for u, n in sorted(self.requests.items())})
            elif cmd == "quit":
                self.finish(0)
            else:
                return f"err unknown command {cmd!r}"
        except (IndexError, ValueError) as exc:
            return f"err bad arguments for {cmd}: {exc or 'missing argument'}"
        except KeyError as exc:
            return f"err {exc.args[0]}"
        return "ok"

    def unit(self, text: str) -> int:
        unit = int(text, 0)
        if unit not in self.devices:
            raise KeyError(f"unit {unit} not served")
        return unit


def reply(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:  # test harness went away: nothing left to do
        os._exit(0)


def stdin_reader(loop: asyncio.AbstractEventLoop, slave: Slave) -> None:
    """Thread: read raw fd 0 (no Python-level stdin lock held at exit), hand lines to the loop."""
    buf, chunk = b"", b"x"
    while chunk:
        try:
            chunk = os.read(0, 4096)
        except OSError:
            chunk = b""
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            loop.call_soon_threadsafe(handle_line, slave, line.decode(errors="replace"))
    if buf.strip():
        loop.call_soon_threadsafe(handle_line, slave, buf.decode(errors="replace"))
    loop.call_soon_threadsafe(slave.finish, 0)  # EOF -> clean exit


def handle_line(slave: Slave, line: str) -> None:
    if not slave.done.done():
        log.debug("command: %s", line.strip())
        reply(slave.command(line))


def parse_units(text: str) -> list[int]:
    units: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        units.extend(range(int(lo), int(hi or lo) + 1))
    if not units or len(units) > MAX_UNITS or len(set(units)) != len(units):
        raise ValueError(f"need 1..{MAX_UNITS} distinct unit ids")
    if any(not 1 <= u <= 247 for u in units):
        raise ValueError("unit ids must be 1..247")
    return units


async def run(args, units: list[int]) -> int:
    slave = Slave(units, args.size)
    server = ModbusSerialServer(
        ModbusServerContext(devices=slave.devices, single=False),
        framer=FramerType.RTU, port=args.port, baudrate=args.baud, bytesize=8, parity="N", stopbits=1,
        ignore_missing_devices=True,  # unknown unit ids get silence, like a real bus
        trace_pdu=slave.trace_pdu, trace_packet=slave.trace_packet, trace_connect=slave.trace_connect,
    )
    try:
        # Opens the port synchronously (pymodbus logs the OSError and raises RuntimeError);
        # the reader is attached one loop iteration later, signalled via trace_connect(True).
        await server.serve_forever(background=True)
        await asyncio.wait_for(slave.ready, 5)
    except (RuntimeError, OSError, asyncio.TimeoutError) as exc:
        print(f"modbus_slave: cannot open serial port {args.port}: {exc!r}", file=sys.stderr)
        return 2
    reply("ready")  # before the stdin reader starts, so `ready` is always the first line
    threading.Thread(target=stdin_reader, args=(asyncio.get_running_loop(), slave), daemon=True).start()
    await slave.done
    slave.closing = True
    await server.shutdown()
    return slave.exit_code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", required=True, help="serial device, e.g. /tmp/x/a")
    parser.add_argument("--baud", type=int, default=9600)
    parser.add_argument("--units", default="1", help="unit ids, e.g. 1,2,3 or 1-16 (max 32)")
    parser.add_argument("--size", type=int, default=2000, help="registers per table (addr 0..N-1)")
    parser.add_argument("--verbose", action="store_true", help="debug logging to stderr")
    args = parser.parse_args()
    try:
        units = parse_units(args.units)
        if not 1 <= args.size <= 65536:
            raise ValueError("--size must be 1..65536")
    except ValueError as exc:
        print(f"modbus_slave: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="modbus_slave %(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args, units))


if __name__ == "__main__":
    sys.exit(main())
