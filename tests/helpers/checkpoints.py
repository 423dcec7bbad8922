"""What the checkpoint and run-lifecycle tests share: damaging a file on disk the way bit rot or an edit would."""


def flip_byte(path, offset):
    """Flip the lowest bit of the byte at ``offset`` (negative: from the end) of the file ``path``."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
