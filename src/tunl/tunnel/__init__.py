"""Pure encapsulation and decapsulation per mode. No I/O: bytes in, offsets or a Drop out."""
