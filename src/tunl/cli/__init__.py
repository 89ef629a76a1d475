"""The `tunl` command: iproute2's words in, typed specs to tunld, iproute2's output back."""
