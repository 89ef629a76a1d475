"""tunld: owns the userspace tunnels of one network namespace."""

# An abstract socket lives in the network namespace that bound it: one tunld per namespace,
# found by every tunl command run in that namespace and by no other.
CONTROL_ADDRESS = "\0tunl/tunld"
