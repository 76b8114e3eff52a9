"""Run a command in which ``socket(AF_PACKET, ...)`` fails with EAFNOSUPPORT, as it does under
systemd's ``RestrictAddressFamilies=`` without AF_PACKET: the same mechanism, a seccomp filter.

    python tests/integration/no_af_packet.py COMMAND [ARG ...]
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
NR_SOCKET_X86_64 = 41
AF_PACKET = 17
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def main(argv: list[str]) -> int:
    if platform.machine() != "x86_64":
        print("no_af_packet: x86_64 only", file=sys.stderr)
        return 2
    # struct seccomp_data: int nr @0; u32 arch @4; u64 ip @8; u64 args[6] @16 (little endian)
    prog = [
        (LD_W_ABS, 0, 0, 4), (JEQ_K, 0, 5, AUDIT_ARCH_X86_64),
        (LD_W_ABS, 0, 0, 0), (JEQ_K, 0, 3, NR_SOCKET_X86_64),
        (LD_W_ABS, 0, 0, 16), (JEQ_K, 0, 1, AF_PACKET),
        (RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    filters = (SockFilter * len(prog))(*(SockFilter(*ins) for ins in prog))
    fprog = SockFprog(len(prog), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        print(f"no_af_packet: prctl: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 2
    os.execv(argv[0], argv)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
