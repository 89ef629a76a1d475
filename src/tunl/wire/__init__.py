"""Pure packet codecs: no sockets, no files, no logging. Bytes in, bytes (or a Drop) out."""
