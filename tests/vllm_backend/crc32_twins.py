"""Images that share a CRC32: the seed of a random draw, which two images may share, unlike their identity."""

import zlib

import torch


def crc32_twin(pixels: torch.Tensor) -> torch.Tensor:
    """Another float32 image of ``pixels``' shape whose bytes have the same CRC32: the first byte flipped, the last 4
    bytes chosen so that the CRC comes back. CRC32 is affine over GF(2) in the message's bits (for a fixed length),
    so those 4 bytes solve a 32 x 32 linear system."""
    data = pixels.to(torch.float32).contiguous().numpy().tobytes()
    head = bytes([data[0] ^ 1]) + data[1:-4]
    base = zlib.crc32(head + bytes(4))
    # Gaussian elimination: per leading bit, a CRC difference and the tail bits that make it.
    basis: dict[int, tuple[int, int]] = {}
    for bit in range(32):
        difference, tail = zlib.crc32(head + (1 << bit).to_bytes(4, "little")) ^ base, 1 << bit
        while difference:
            lead = difference.bit_length() - 1
            if lead not in basis:
                basis[lead] = (difference, tail)
                break
            difference, tail = difference ^ basis[lead][0], tail ^ basis[lead][1]
    wanted, tail = zlib.crc32(data) ^ base, 0
    while wanted:
        difference, bits = basis[wanted.bit_length() - 1]
        wanted, tail = wanted ^ difference, tail ^ bits
    return torch.frombuffer(bytearray(head + tail.to_bytes(4, "little")), dtype=torch.float32).reshape(pixels.shape)
