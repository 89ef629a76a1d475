"""tunl: IP-in-IP tunnels and overlay networks on Linux, with the words of `ip tunnel`."""

__version__ = "0.1.0"
