"""The userspace data plane: TUN devices, raw sockets, forwarding table, counters, threads."""
