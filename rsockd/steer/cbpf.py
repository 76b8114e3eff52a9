"""Classic BPF: an assembler, the tunnel-segment filter, and an interpreter.  Pure, except the
two Linux socket helpers at the end.

Classic BPF is the BSD packet filter language (McCanne & Jacobson, 1993) that Linux packet
sockets (``SO_ATTACH_FILTER``) and macOS BPF devices (``BIOCSETF``) both run.  An instruction
is ``struct sock_filter`` / ``struct bpf_insn``: ``u16 code, u8 jt, u8 jf, u32 k`` in host byte
order.  Conditional jumps are forward only and 8 bits wide; the assembler resolves labels and
inserts ``ja`` trampolines where a target is more than 255 instructions away.

Loads are big-endian.  A load past the end of the packet ends the program with 0 (reject) on
both kernels, so the filter needs no explicit length checks: a truncated packet is rejected by
the first load that does not fit.  ``run()`` implements the same semantics so the filter logic
can be tested without a kernel; the integration tests run the same programs in the kernel.

``tunnel_filter`` states the match rule of docs/design.md ("Maps", match rule):

- server: IPv4/IPv6 TCP whose destination port is a tunnel port;
- client: IPv4/IPv6 TCP from a peer address whose source port is a tunnel port and whose
  destination port is one of our local ports.

``syns=False`` (server, nft backend) also rejects SYNs without ACK: those reach the daemon
through the SYN queue once their tag is checked, never before.

IPv4 fragments (MF set or a non-zero offset) are rejected: a non-first fragment carries no
ports, and a first fragment is useless to a receiver that never reassembles.  IPv6 packets
must carry TCP directly (no extension headers).
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn

from ..core.faketcp import Role
from ..core.packet import pack_address

# ---------------------------------------------------------------------------------------------
# Opcodes (<linux/bpf_common.h>, <net/bpf.h>)

# instruction classes
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_ST = 0x02
BPF_STX = 0x03
BPF_ALU = 0x04
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_MISC = 0x07
# load sizes
BPF_W = 0x00
BPF_H = 0x08
BPF_B = 0x10
# load modes
BPF_IMM = 0x00
BPF_ABS = 0x20
BPF_IND = 0x40
BPF_MEM = 0x60
BPF_LEN = 0x80
BPF_MSH = 0xA0
# ALU operations
BPF_ADD = 0x00
BPF_SUB = 0x10
BPF_MUL = 0x20
BPF_DIV = 0x30
BPF_OR = 0x40
BPF_AND = 0x50
BPF_LSH = 0x60
BPF_RSH = 0x70
BPF_NEG = 0x80
BPF_MOD = 0x90
BPF_XOR = 0xA0
# jumps
BPF_JA = 0x00
BPF_JEQ = 0x10
BPF_JGT = 0x20
BPF_JGE = 0x30
BPF_JSET = 0x40
# operand source (ALU, JMP)
BPF_K = 0x00
BPF_X = 0x08
# return value source
BPF_A = 0x10
# BPF_MISC operations
BPF_TAX = 0x00
BPF_TXA = 0x80

BPF_MEMWORDS = 16
#: Longest program Linux accepts.  macOS accepts 512 (its ``BPF_MAXINSNS``).
BPF_MAXINSNS = 4096
#: Accept length returned for a matching packet (the snap length: the whole packet).
ACCEPT = 0x40000

SOCK_FILTER = struct.Struct("HBBI")  # code, jt, jf, k in host order (struct sock_filter / bpf_insn)

_U32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Instruction:
    """One instruction; ``jt``/``jf`` are relative forward offsets (0 = the next instruction)."""

    code: int
    jt: int = 0
    jf: int = 0
    k: int = 0

    def pack(self) -> bytes:
        return SOCK_FILTER.pack(self.code, self.jt, self.jf, self.k & _U32)

    def __str__(self) -> str:
        return f"{{ 0x{self.code:02x}, {self.jt}, {self.jf}, 0x{self.k:08x} }}"


@dataclass(frozen=True, slots=True)
class Program:
    """An assembled program."""

    instructions: tuple[Instruction, ...]

    def pack(self) -> bytes:
        """The program as an array of ``struct sock_filter`` (= macOS ``struct bpf_insn``)."""
        return b"".join(i.pack() for i in self.instructions)

    @classmethod
    def unpack(cls, data: bytes) -> Program:
        """The inverse of ``pack``."""
        if len(data) % SOCK_FILTER.size:
            raise ValueError(f"{len(data)} bytes is not a whole number of instructions")
        return cls(tuple(Instruction(*f) for f in SOCK_FILTER.iter_unpack(data)))

    def __len__(self) -> int:
        return len(self.instructions)

    def __str__(self) -> str:
        """One instruction a line, in the form of ``tcpdump -dd``."""
        return "\n".join(str(i) for i in self.instructions)


def drop_all() -> Program:
    """``ret #0``: a filter that accepts nothing (for raw send sockets)."""
    return Program((Instruction(BPF_RET | BPF_K, k=0),))


# ---------------------------------------------------------------------------------------------
# Assembler


@dataclass(slots=True)
class _Op:
    code: int
    k: int
    jt: str | None  # label, None = the next instruction
    jf: str | None
    target: str | None = None  # ja


class Assembler:
    """Builds a ``Program`` from instructions with symbolic (label) jump targets.

        asm = Assembler()
        asm.op(BPF_LD | BPF_H | BPF_ABS, 12)
        asm.jump(BPF_JEQ, 0x0800, jt="ip", jf="drop")
        asm.label("ip")
        asm.ret(ACCEPT)
        asm.label("drop")
        asm.ret(0)
        program = asm.assemble()
    """

    def __init__(self) -> None:
        self._ops: list[_Op] = []
        self._labels: dict[str, int] = {}  # label -> index of the op that follows it
        self._fresh = 0

    def new_label(self, hint: str = "L") -> str:
        """A label name not used before (place it with ``label``)."""
        self._fresh += 1
        return f".{hint}{self._fresh}"

    def label(self, name: str) -> None:
        """Mark the position of the next instruction as ``name``."""
        if name in self._labels:
            raise ValueError(f"label {name!r} defined twice")
        self._labels[name] = len(self._ops)

    def op(self, code: int, k: int = 0) -> None:
        """Any instruction that is not a jump (loads, stores, ALU, ret, tax/txa)."""
        if code & 0x07 == BPF_JMP:
            raise ValueError("use jump() or ja() for jumps")
        self._ops.append(_Op(code, k & _U32, None, None))

    def ret(self, k: int) -> None:
        self.op(BPF_RET | BPF_K, k)

    def jump(self, op: int, k: int = 0, jt: str | None = None, jf: str | None = None) -> None:
        """A conditional jump: ``op`` is BPF_JEQ/JGT/JGE/JSET (| BPF_X); None = fall through."""
        code = BPF_JMP | op
        if op & 0xF0 == BPF_JA:
            raise ValueError("use ja() for unconditional jumps")
        self._ops.append(_Op(code, k & _U32, jt, jf))

    def ja(self, target: str) -> None:
        """An unconditional jump (32-bit offset, no range limit)."""
        self._ops.append(_Op(BPF_JMP | BPF_JA, 0, None, None, target))

    def assemble(self) -> Program:
        """Resolve labels.  Conditional targets beyond 255 get a ``ja`` trampoline."""
        far: set[tuple[int, str]] = set()  # (op index, "jt"/"jf") that go through a trampoline
        while True:
            start = self._layout(far)
            grown = False
            for i, o in enumerate(self._ops):
                if o.target is not None or o.code & 0x07 != BPF_JMP:
                    continue
                for which, lbl in (("jt", o.jt), ("jf", o.jf)):
                    if lbl is None or (i, which) in far:
                        continue
                    # The op's trampolines sit right after it, so its natural offset counts them.
                    if self._where(lbl, start, i) - start[i + 1] + self._ntramp(far, i) > 255:
                        far.add((i, which))
                        grown = True
            if not grown:
                break
        out: list[Instruction] = []
        for i, o in enumerate(self._ops):
            pc = start[i]
            if o.target is not None:
                out.append(Instruction(o.code, 0, 0, self._where(o.target, start, i) - pc - 1))
                continue
            if o.code & 0x07 != BPF_JMP:
                out.append(Instruction(o.code, 0, 0, o.k))
                continue
            after = pc + 1 + self._ntramp(far, i)  # the first instruction after the trampolines
            offsets: list[int] = []
            tramps: list[Instruction] = []
            for which, lbl in (("jt", o.jt), ("jf", o.jf)):
                dest = after if lbl is None else self._where(lbl, start, i)
                if (i, which) in far:
                    slot = pc + 1 + len(tramps)
                    offsets.append(slot - pc - 1)
                    tramps.append(Instruction(BPF_JMP | BPF_JA, 0, 0, dest - slot - 1))
                else:
                    offsets.append(dest - pc - 1)
            out.append(Instruction(o.code, offsets[0], offsets[1], o.k))
            out.extend(tramps)
        return Program(tuple(out))

    @staticmethod
    def _ntramp(far: set[tuple[int, str]], i: int) -> int:
        return ((i, "jt") in far) + ((i, "jf") in far)

    def _layout(self, far: set[tuple[int, str]]) -> list[int]:
        """Start pc of each op (and one past the end)."""
        start = [0]
        for i in range(len(self._ops)):
            start.append(start[-1] + 1 + self._ntramp(far, i))
        return start

    def _where(self, label: str, start: list[int], i: int) -> int:
        try:
            at = self._labels[label]
        except KeyError:
            raise ValueError(f"undefined label {label!r}") from None
        if at <= i:
            raise ValueError(f"jump from instruction {i} to label {label!r} is not forward")
        if at >= len(self._ops):
            raise ValueError(f"label {label!r} is not followed by an instruction")
        return start[at]


# ---------------------------------------------------------------------------------------------
# Interpreter


def run(program: Program, packet: bytes) -> int:
    """Run ``program`` on ``packet`` and return its verdict (0 = reject, else accept length).

    Kernel semantics: registers and scratch memory start at 0, a load past the end of the
    packet or a division by zero returns 0.  Linux ancillary loads (negative offsets) are not
    supported.  Raises ``ValueError`` for a malformed program.
    """
    ins = program.instructions
    n = len(ins)
    a = x = 0
    mem = [0] * BPF_MEMWORDS
    plen = len(packet)
    pc = 0
    while pc < n:
        i = ins[pc]
        pc += 1
        code, k = i.code, i.k
        cls = code & 0x07
        if cls == BPF_RET:
            return k if code & 0x18 == BPF_K else a if code & 0x18 == BPF_A else _bad(i)
        if cls in (BPF_LD, BPF_LDX):
            mode, size = code & 0xE0, code & 0x18
            if mode in (BPF_ABS, BPF_IND, BPF_MSH):
                off = k if mode != BPF_IND else (x + k) & _U32
                if k >= 0x80000000:
                    raise ValueError(f"ancillary/negative load offset {k:#x} is not supported")
                width = {BPF_W: 4, BPF_H: 2, BPF_B: 1}.get(size) or _bad(i)
                if off + width > plen:
                    return 0
                v = int.from_bytes(packet[off : off + width], "big")
                if mode == BPF_MSH:
                    if cls != BPF_LDX or size != BPF_B:
                        _bad(i)
                    x = (v & 0x0F) * 4
                elif cls == BPF_LD:
                    a = v
                else:
                    _bad(i)
                continue
            v = k if mode == BPF_IMM else mem[_mem(i)] if mode == BPF_MEM else plen if mode == BPF_LEN else _bad(i)
            if cls == BPF_LD:
                a = v
            else:
                x = v
        elif cls == BPF_ST:
            mem[_mem(i)] = a
        elif cls == BPF_STX:
            mem[_mem(i)] = x
        elif cls == BPF_ALU:
            op = code & 0xF0
            src = x if code & BPF_X else k
            if op == BPF_NEG:
                a = -a & _U32
            elif op in (BPF_DIV, BPF_MOD) and src == 0:
                return 0
            else:
                a = _alu(op, a, src, i)
        elif cls == BPF_JMP:
            op = code & 0xF0
            if op == BPF_JA:
                pc += k
            else:
                src = x if code & BPF_X else k
                if op == BPF_JEQ:
                    taken = a == src
                elif op == BPF_JGT:
                    taken = a > src
                elif op == BPF_JGE:
                    taken = a >= src
                elif op == BPF_JSET:
                    taken = bool(a & src)
                else:
                    _bad(i)
                pc += i.jt if taken else i.jf
            if pc >= n:
                raise ValueError(f"jump past the end of the program at instruction {pc}")
        else:  # BPF_MISC
            if code & 0xF8 == BPF_TAX:
                x = a
            elif code & 0xF8 == BPF_TXA:
                a = x
            else:
                _bad(i)
    raise ValueError("program ran off its end without ret")


def _alu(op: int, a: int, src: int, i: Instruction) -> int:
    if op == BPF_ADD:
        r = a + src
    elif op == BPF_SUB:
        r = a - src
    elif op == BPF_MUL:
        r = a * src
    elif op == BPF_DIV:
        r = a // src
    elif op == BPF_MOD:
        r = a % src
    elif op == BPF_OR:
        r = a | src
    elif op == BPF_AND:
        r = a & src
    elif op == BPF_XOR:
        r = a ^ src
    elif op == BPF_LSH:
        r = a << src if src < 32 else 0
    elif op == BPF_RSH:
        r = a >> src if src < 32 else 0
    else:
        _bad(i)
    return r & _U32


def _mem(i: Instruction) -> int:
    if i.k >= BPF_MEMWORDS:
        raise ValueError(f"scratch memory index {i.k} out of range in {i}")
    return i.k


def _bad(i: Instruction) -> NoReturn:
    raise ValueError(f"unsupported instruction {i}")


# ---------------------------------------------------------------------------------------------
# The tunnel-segment filter

Link = Literal["raw", "en10mb", "null"]
_DEFAULT_L3 = {"raw": 0, "en10mb": 14, "null": 4}
_ETH_P_IP, _ETH_P_IPV6 = 0x0800, 0x86DD
# DLT_NULL carries the sender's address family in host byte order; these are macOS's values
# (AF_INET6 is 30 there, not Linux's 10).
_NULL_AF_INET, _NULL_AF_INET6 = 2, 30
_PROTO_TCP = 6


def port_ranges(ports: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, merged inclusive ranges covering ``ports``: {80, 443, 444, 445} → [(80, 80), (443, 445)]."""
    out: list[tuple[int, int]] = []
    for p in sorted(set(ports)):
        if not 0 <= p <= 0xFFFF:
            raise ValueError(f"port {p} is out of range")
        if out and out[-1][1] + 1 == p:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out


def tunnel_filter(
    role: Role,
    tunnel_ports: Iterable[int],
    local_ports: Iterable[int] = (),
    peers: Iterable[str | bytes] = (),
    *,
    l3_offset: int | None = None,
    link: Link = "raw",
    accept: int = ACCEPT,
    syns: bool = True,
) -> Program:
    """A filter accepting exactly the tunnel segments of ``role`` (see the module docstring).

    ``link`` says how the filter learns the IP version: ``raw`` from the version nibble of the
    IP header at ``l3_offset`` (Linux ``AF_PACKET``/``SOCK_DGRAM``: 0); ``en10mb`` from the
    Ethernet type just before it (macOS/Linux Ethernet: 14); ``null`` from the 4-byte host-order
    address family of BSD loopback (DLT_NULL: 4).  Port sets compile into a binary search over
    merged ranges.  ``syns=False``: reject segments with SYN set and ACK clear.  Raises
    ``ValueError`` for bad ports or addresses or a program that would exceed ``BPF_MAXINSNS``.
    """
    l3 = _DEFAULT_L3[link] if l3_offset is None else l3_offset
    if l3 < 0 or (link == "en10mb" and l3 < 2) or (link == "null" and l3 < 4):
        raise ValueError(f"l3_offset {l3} leaves no room for the {link} link header")
    tunnel = port_ranges(tunnel_ports)
    if role == "server":
        local: list[tuple[int, int]] = []
        peers4: list[int] = []
        peers6: list[bytes] = []
        families = {4, 6}
    elif role == "client":
        local = port_ranges(local_ports)
        packed = sorted({pack_address(p) for p in peers})
        peers4 = [int.from_bytes(p, "big") for p in packed if len(p) == 4]
        peers6 = [p for p in packed if len(p) == 16]
        families = {f for f, have in ((4, peers4), (6, peers6)) if have}
        if not local:
            families = set()
    else:
        raise ValueError(f"role {role!r} is neither server nor client")
    if not tunnel or not families:
        return drop_all()

    asm = Assembler()
    v4 = "v4" if 4 in families else "reject"
    v6 = "v6" if 6 in families else "reject"
    _emit_family(asm, link, l3, v4, v6)
    if 6 in families:
        asm.label("v6")
        asm.op(BPF_LD | BPF_B | BPF_ABS, l3 + 6)  # next header
        asm.jump(BPF_JEQ, _PROTO_TCP, None, "reject")
        if role == "client":
            _emit_peers6(asm, l3, peers6, "ip6ok", "reject")
            asm.label("ip6ok")
        asm.op(BPF_LDX | BPF_W | BPF_IMM, 40)
        asm.ja("ports")
    if 4 in families:
        asm.label("v4")
        asm.op(BPF_LD | BPF_B | BPF_ABS, l3 + 9)  # protocol
        asm.jump(BPF_JEQ, _PROTO_TCP, None, "reject")
        asm.op(BPF_LD | BPF_H | BPF_ABS, l3 + 6)  # flags + fragment offset
        asm.jump(BPF_JSET, 0x3FFF, "reject", None)  # MF or offset
        if role == "client":
            asm.op(BPF_LD | BPF_W | BPF_ABS, l3 + 12)  # source address
            _emit_in_ranges(asm, [(p, p) for p in peers4], "ip4ok", "reject", 0, _U32)
            asm.label("ip4ok")
        asm.op(BPF_LDX | BPF_B | BPF_MSH, l3)  # X = IHL * 4
    asm.label("ports")
    if role == "server":
        asm.op(BPF_LD | BPF_H | BPF_IND, l3 + 2)  # destination port
        _emit_in_ranges(asm, tunnel, "accept" if syns else "flags", "reject", 0, 0xFFFF)
        if not syns:
            asm.label("flags")
            asm.op(BPF_LD | BPF_B | BPF_IND, l3 + 13)  # TCP flags
            asm.op(BPF_ALU | BPF_AND | BPF_K, 0x12)  # SYN | ACK
            asm.jump(BPF_JEQ, 0x02, "reject", "accept")
    else:
        asm.op(BPF_LD | BPF_H | BPF_IND, l3)  # source port
        _emit_in_ranges(asm, tunnel, "sport_ok", "reject", 0, 0xFFFF)
        asm.label("sport_ok")
        asm.op(BPF_LD | BPF_H | BPF_IND, l3 + 2)  # destination port
        _emit_in_ranges(asm, local, "accept", "reject", 0, 0xFFFF)
    asm.label("accept")
    asm.ret(accept)
    asm.label("reject")
    asm.ret(0)
    program = asm.assemble()
    if len(program) > BPF_MAXINSNS:
        raise ValueError(f"filter needs {len(program)} instructions (more than {BPF_MAXINSNS}): too many port ranges")
    return program


def _emit_family(asm: Assembler, link: Link, l3: int, v4: str, v6: str) -> None:
    """Dispatch on the IP version; IPv4 also needs a header length of at least 20 (IHL >= 5)."""
    if link == "raw":
        c6 = asm.new_label("c6")
        asm.op(BPF_LD | BPF_B | BPF_ABS, l3)
        asm.jump(BPF_JGE, 0x60, c6, None)
        asm.jump(BPF_JGE, 0x45, None, "reject")
        asm.jump(BPF_JGT, 0x4F, "reject", v4)  # 0x45..0x4f: version 4, IHL >= 5
        asm.label(c6)
        asm.jump(BPF_JGT, 0x6F, "reject", v6)  # 0x60..0x6f: version 6
        return
    c4, c6 = asm.new_label("c4"), asm.new_label("c6")
    if link == "en10mb":
        asm.op(BPF_LD | BPF_H | BPF_ABS, l3 - 2)
        fam4, fam6 = _ETH_P_IP, _ETH_P_IPV6
    else:
        asm.op(BPF_LD | BPF_W | BPF_ABS, l3 - 4)
        fam4, fam6 = (int.from_bytes(af.to_bytes(4, sys.byteorder), "big") for af in (_NULL_AF_INET, _NULL_AF_INET6))
    asm.jump(BPF_JEQ, fam4, c4 if v4 != "reject" else "reject", None)
    asm.jump(BPF_JEQ, fam6, c6 if v6 != "reject" else "reject", "reject")
    # The link header and the IP header must agree on the version.
    if v4 != "reject":
        asm.label(c4)
        asm.op(BPF_LD | BPF_B | BPF_ABS, l3)
        asm.jump(BPF_JGE, 0x45, None, "reject")
        asm.jump(BPF_JGT, 0x4F, "reject", v4)
    if v6 != "reject":
        asm.label(c6)
        asm.op(BPF_LD | BPF_B | BPF_ABS, l3)
        asm.op(BPF_ALU | BPF_AND | BPF_K, 0xF0)
        asm.jump(BPF_JEQ, 0x60, v6, "reject")


def _emit_in_ranges(asm: Assembler, ranges: Sequence[tuple[int, int]], yes: str, no: str, lo: int, top: int) -> None:
    """Jump to ``yes`` if A lies in one of the sorted, disjoint ``ranges``, else to ``no``.

    A binary search: each inner node splits at the start of a range, so a leaf needs its lower
    bound check only when the path has not proved it (``lo``), and no upper check at ``top``.
    """
    if not ranges:
        asm.ja(no)
        return
    if len(ranges) > 1:
        mid = len(ranges) // 2
        right = asm.new_label("r")
        asm.jump(BPF_JGE, ranges[mid][0], right, None)
        _emit_in_ranges(asm, ranges[:mid], yes, no, lo, top)
        asm.label(right)
        _emit_in_ranges(asm, ranges[mid:], yes, no, ranges[mid][0], top)
        return
    a, b = ranges[0]
    need_lo, need_hi = a > lo, b < top
    if need_lo and need_hi and a == b:
        asm.jump(BPF_JEQ, a, yes, no)
    elif need_lo and need_hi:
        asm.jump(BPF_JGE, a, None, no)
        asm.jump(BPF_JGT, b, no, yes)
    elif need_lo:
        asm.jump(BPF_JGE, a, yes, no)
    elif need_hi:
        asm.jump(BPF_JGT, b, no, yes)
    else:
        asm.ja(yes)


def _emit_peers6(asm: Assembler, l3: int, peers: Sequence[bytes], yes: str, no: str) -> None:
    """Compare the IPv6 source address (4 words at l3+8) with each peer in turn."""
    for n, addr in enumerate(peers):
        fail = no if n == len(peers) - 1 else asm.new_label("p")
        words = struct.unpack("!4I", addr)
        for w, word in enumerate(words):
            asm.op(BPF_LD | BPF_W | BPF_ABS, l3 + 8 + 4 * w)
            asm.jump(BPF_JEQ, word, yes if w == 3 else None, fail)
        if fail != no:
            asm.label(fail)


# ---------------------------------------------------------------------------------------------
# Linux sockets

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27


def attach_filter(sock: socket.socket, program: Program) -> None:
    """Attach (or atomically replace) the socket's filter with ``SO_ATTACH_FILTER`` (Linux).

    Raises ``OSError`` as the kernel reports it (EINVAL for a program it rejects).
    """
    if not 0 < len(program) <= BPF_MAXINSNS:
        raise ValueError(f"a filter has 1..{BPF_MAXINSNS} instructions, not {len(program)}")
    # The kernel copies the instructions during setsockopt, so the buffer only has to outlive
    # the call; struct sock_fprog is {unsigned short len; struct sock_filter *filter;} ("HL"
    # with native alignment: 16 bytes on LP64).
    buf = ctypes.create_string_buffer(program.pack())
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    del buf


def detach_filter(sock: socket.socket) -> None:
    """Remove the socket's filter; no error when it has none (Linux)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as err:
        if err.errno != 2:  # ENOENT: no filter attached
            raise
